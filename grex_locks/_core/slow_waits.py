"""Logging the waits that last too long, with who holds the lock, at no cost to the rest.

A wait is registered when it starts blocking and unregistered when it ends;
one monitor thread per process sleeps until the oldest registered wait
crosses :data:`SLOW_WAIT_SECONDS`, then logs it once at WARNING with a
diagnosis of the holder. The diagnosis is computed lazily, only if a loguru
handler will emit the line, so a library user who never enables logging
pays one dictionary insert per contended wait and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from .threads import start_daemon

#: A wait longer than this is logged (at WARNING) with who holds the lock.
SLOW_WAIT_SECONDS = 5.0

_ids = itertools.count()
#: Guards the monitor's state. A plain lock, not a ``threading.Condition``:
#: waits register from the caller's thread, where a Ctrl-C landing inside a
#: Condition's Python-level ``__enter__`` would leave it locked for good.
_mutex = threading.Lock()
#: Released to wake the monitor early (a C-level lock: see ``_mutex``).
_kick = threading.Lock()
_kick.acquire()
_waits: dict[int, tuple[float, object, str]] = {}
_monitor: threading.Thread | None = None
#: The running monitor thread's ident. An interruption inside ``Thread.start()``
#: can leave ``_monitor`` unset while the thread runs anyway (no other is
#: started then), or never runs (another is); two would log each wait twice.
_monitor_ident: list[int | None] = [None]
#: When the monitor will wake by itself (``time.monotonic()``), None: not until notified.
_monitor_wakes_at: list[float | None] = [0.0]


def _unknown_holder(path: object) -> str:
    return "holder unknown"


#: How a slow wait's log line names the holder. The core cannot diagnose (that
#: layer sits above it and imports it); the public layer installs its
#: diagnosis here through :func:`describe_holders_with`.
_describe_holder: Callable[[Path], str] = _unknown_holder


def describe_holders_with(describe: Callable[[Path], str]) -> None:
    """Name the holder of a lock file in slow-wait log lines with ``describe``."""
    global _describe_holder  # noqa: PLW0603 - set once, by the layer above
    _describe_holder = describe


def _holder_of(path: object) -> str:
    if isinstance(path, Path):
        return _describe_holder(path)
    # Something that is not one lock file (a scheduler's permits) says itself
    # who holds what it waits for.
    describe = getattr(path, "describe_holders", None)
    return str(describe()) if callable(describe) else "holder unknown"


def _monitor_loop() -> None:
    with _mutex:
        if _monitor_ident[0] is not None:
            return
        _monitor_ident[0] = threading.get_ident()
    reported: set[int] = set()
    while True:
        due: list[tuple[float, object, str]] = []
        with _mutex:
            reported &= set(_waits)
            now = time.monotonic()
            next_due: float | None = None
            for wait_id, (started, path, kind) in list(_waits.items()):
                if wait_id in reported:
                    continue
                left = started + SLOW_WAIT_SECONDS - now
                if left <= 0:
                    due.append((started, path, kind))
                    reported.add(wait_id)
                elif next_due is None or left < next_due:
                    next_due = left
            if not due:
                # Sleep until the next wait turns slow, or (if none is
                # pending) until one is added.
                _monitor_wakes_at[0] = None if next_due is None else now + next_due
        if not due:
            _kick.acquire(True, -1 if next_due is None else next_due)
            continue
        for started, path, kind in due:
            logger.opt(lazy=True).warning(
                "still waiting after {:.1f} s for {} {}: {}",
                lambda started=started: time.monotonic() - started,
                lambda kind=kind: kind,
                lambda path=path: path,
                functools.partial(_holder_of, path),
            )


def _register(path: object, kind: str) -> int:
    global _monitor  # noqa: PLW0603 - one monitor thread per process, started lazily
    wait_id = next(_ids)
    with _mutex:
        _waits[wait_id] = (time.monotonic(), path, kind)
        if _monitor is None and _monitor_ident[0] is None:
            _monitor = start_daemon(_monitor_loop, "grex-locks-slow-waits")
        else:
            # Wake the monitor only if it would sleep past this wait's turn:
            # waking it on every contended acquire costs a thread switch each.
            wakes_at = _monitor_wakes_at[0]
            if wakes_at is None or _waits[wait_id][0] + SLOW_WAIT_SECONDS < wakes_at:
                _monitor_wakes_at[0] = 0.0
                with contextlib.suppress(RuntimeError):  # kicked already
                    _kick.release()
    return wait_id


def _forget(wait_id: int) -> None:
    # No lock: a dict pop is atomic, and the monitor reads a snapshot. This
    # runs right after a hand-off, on the waiter's critical path.
    _waits.pop(wait_id, None)


class watching:
    """Register a blocking wait on a lock file with the slow-wait monitor while it lasts.

    ``what`` is ``(lock file, what kind of lock)``, or ``None`` for a wait
    that is not logged. A wait interrupted at any point is forgotten on the
    way out: ``__exit__`` runs whenever ``__enter__`` has returned, and an
    interruption inside ``__enter__`` can only leave an entry that is logged
    once and never again.
    """

    __slots__ = ("_id", "_what")

    def __init__(self, what: tuple[object, str] | None) -> None:
        self._what = what
        self._id: int | None = None

    def __enter__(self) -> None:
        if self._what is not None:
            self._id = _register(*self._what)

    def __exit__(self, *exc_info: object) -> None:
        if self._id is not None:
            _forget(self._id)


def reset_after_fork() -> None:
    """In a forked child: no waits in progress, and no monitor thread yet."""
    global _monitor, _mutex, _kick  # noqa: PLW0603 - recreated after fork, like the gate's mutex
    _mutex = threading.Lock()
    _kick = threading.Lock()
    _kick.acquire()
    _waits.clear()
    _monitor = None
    _monitor_ident[0] = None
    _monitor_wakes_at[0] = 0.0


os.register_at_fork(after_in_child=reset_after_fork)
