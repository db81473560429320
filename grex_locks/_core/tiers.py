"""The fixed acquisition order of grex's five locks, checked before any wait.

Every thread (and every asyncio task) keeps a stack of the tiers it holds in
a :class:`contextvars.ContextVar`: threads start with an empty context, and
asyncio tasks copy their creator's, so one mechanism serves both. Because
the stack is an immutable tuple, a task that copies it cannot disturb the
stack it was copied from.

Acquiring a tier that is not strictly greater than every tier held is the
only way to build a wait-for cycle out of these locks, so refusing it before
waiting is the whole deadlock argument.
"""

from __future__ import annotations

import contextvars
import enum
import os
import sys
import warnings
from pathlib import Path
from typing import Literal

from loguru import logger

from grex_locks.errors import TierOrderWarning, TierViolation

from .undo import Undo

TierCheckMode = Literal["raise", "warn", "off"]
_MODES: tuple[TierCheckMode, ...] = ("raise", "warn", "off")
ENV_VAR = "GREX_LOCKS_TIER_CHECK"


class Tier(enum.IntEnum):
    """The five lock tiers, outermost first; acquire in increasing order."""

    WORKSPACE_SYNC = 0
    SEMAPHORE = 1
    PER_PACK = 2
    BACKEND = 3
    MANIFEST = 4


# Entries are (tier, token): the token lets a release remove exactly its own
# entry, and makes removing it twice harmless.
_held: contextvars.ContextVar[tuple[tuple[Tier, object], ...]] = contextvars.ContextVar(
    "grex_locks_held_tiers", default=()
)


def _mode_from_env() -> TierCheckMode:
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw == "":
        return "raise"
    value = raw.strip().lower()
    for mode in _MODES:
        if value == mode:
            return mode
    logger.warning("{}={!r} is not one of raise, warn, off; keeping 'raise'", ENV_VAR, raw)
    return "raise"


_mode: TierCheckMode = _mode_from_env()


def set_tier_check(mode: TierCheckMode) -> None:
    """Choose what a broken lock order does: ``"raise"``, ``"warn"`` or ``"off"``.

    Overrides ``GREX_LOCKS_TIER_CHECK``. Same-thread re-entry on a held lock is
    refused in every mode; this only governs the order between different locks.
    """
    global _mode  # noqa: PLW0603 - one process-wide setting, like logging levels
    if mode not in _MODES:
        raise ValueError(f"tier check mode must be one of {', '.join(_MODES)}, not {mode!r}")
    _mode = mode


def tier_check_mode() -> TierCheckMode:
    """The tier check mode in force."""
    return _mode


def held_tiers() -> tuple[Tier, ...]:
    """The tiers the calling thread or task holds, in acquisition order."""
    return tuple(tier for tier, _ in _held.get())


def enter_tier(stack: Undo, tier: Tier, path: Path | None) -> None:
    """Check ``tier`` against what this thread holds and push it onto ``stack``.

    Raises :class:`TierViolation` in ``"raise"`` mode. The matching pop is
    registered on ``stack`` before the push, so that unwinding at any moment
    (or releasing the hold) drops exactly this entry.
    """
    token = object()
    stack.push(pop_tier, token)
    push_tier(token, tier, path)


def push_tier(token: object, tier: Tier, path: Path | None) -> None:
    """Check ``tier`` against what this thread holds, then hold it as ``token``.

    The caller keeps ``token`` (to :func:`pop_tier` it) *before* calling, so
    that an interruption at any moment leaves nothing it cannot undo. Raises
    :class:`TierViolation` in ``"raise"`` mode.
    """
    held = _held.get()
    if held and _mode != "off":
        top = max(entry[0] for entry in held)
        if tier <= top:
            violation = TierViolation(path, held=top, requested=tier)
            if _mode == "raise":
                raise violation
            # Asked for by the program, so visible by default (once per call
            # site, Python's rule for warnings), and logged for those who log.
            warnings.warn(str(violation), TierOrderWarning, stacklevel=_callers_level())
            logger.error("{}", violation)
    _held.set((*held, (tier, token)))


def _callers_level() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside grex_locks."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "grex_locks."
    ):
        frame = frame.f_back
        level += 1
    return level - 1


def pop_tier(token: object) -> None:
    """Stop holding the tier entered as ``token``; nothing if it is not held (idempotent)."""
    held = _held.get()
    if held and held[-1][1] is token:
        _held.set(held[:-1])
        return
    # Releases may come in any order when a caller mixes release() and with.
    remaining = tuple(entry for entry in held if entry[1] is not token)
    if len(remaining) != len(held):
        _held.set(remaining)


def reset_after_fork() -> None:
    """Forget every tier held: a forked child holds no locks."""
    _held.set(())


os.register_at_fork(after_in_child=reset_after_fork)
