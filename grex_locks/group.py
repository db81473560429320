"""Taking several locks of one tier at once, in an order that cannot deadlock.

Two threads that take packs A and B — one as ``[A, B]``, the other as
``[B, A]`` — deadlock if each takes its first and waits for its second. The
remedy is one global order: every group is taken sorted by lock file
identity, whatever order it was given in. The group counts as a single hold
of its tier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ._core.tiers import enter_tier
from ._core.undo import Undo, UndoHandle, held_until_released
from ._core.waiting import CancelEvent, deadline_after
from .locks import _checked_cancel, _describe, _FileLock

_ACCEPTED = "PackLock, WorkspaceLock, BackendLock or ManifestLock objects"


class HeldGroup(UndoHandle):
    """Locks taken by :func:`acquire_all`; a context manager that releases them all."""

    __slots__ = ("locks",)

    def __init__(self, undo: Undo, locks: list[_FileLock]) -> None:
        super().__init__(undo, "group of locks")
        self.locks = locks


def acquire_all(
    locks: Iterable[_FileLock],
    *,
    timeout: float | None = None,
    cancel: CancelEvent | None = None,
) -> HeldGroup:
    """Take every lock in ``locks`` (all of one tier), sorted by file identity.

    The same lock file given twice is taken once; an empty list is a no-op.
    ``timeout`` covers the whole group (``None`` or ``math.inf``: no limit);
    ``cancel`` is an event, as for one lock. On any failure the locks
    already taken are released before the error propagates. Locks of
    different tiers are a ``ValueError``; anything but a lock is a
    ``TypeError``, raised before anything is taken.
    """
    cancel = _checked_cancel(cancel)
    unique: dict[tuple[int, int], _FileLock] = {}
    for lock in _locks_in(locks):
        unique.setdefault(lock._core.key, lock)
    tiers = {lock._core.tier for lock in unique.values()}
    if len(tiers) > 1:
        names = ", ".join(sorted(tier.name for tier in tiers))
        raise ValueError(f"acquire_all takes locks of one tier, got {names}")
    started = time.monotonic()
    deadline = deadline_after(timeout)
    ordered = [unique[key] for key in sorted(unique)]
    for lock in ordered:
        lock._core.refuse_reentry()

    def take_all(undo: Undo) -> HeldGroup:
        if ordered:
            enter_tier(undo, ordered[0]._core.tier, ordered[0].path)
        for lock in ordered:
            undo.push(lock._core.release_if_held)
            lock._take(
                wait=lock._waits, deadline=deadline, cancel=cancel, tier_taken=True, started=started
            )
        return HeldGroup(undo, ordered)

    return held_until_released(take_all)


def _locks_in(locks: Iterable[_FileLock]) -> list[_FileLock]:
    """Every item of ``locks``, each checked to be a lock; a ``TypeError`` naming one that is not.

    Checked in full before anything is taken.
    """
    if isinstance(locks, (_FileLock, str, bytes, os.PathLike)) or not isinstance(locks, Iterable):
        raise TypeError(
            f"acquire_all takes a list (or other iterable) of {_ACCEPTED}, "
            f"not {_describe(locks)}; to take one lock, pass [lock]"
        )
    given = list(locks)
    for index, lock in enumerate(given):
        if not isinstance(lock, _FileLock):
            raise TypeError(f"acquire_all takes {_ACCEPTED}; item {index} is {_describe(lock)}")
    return given
