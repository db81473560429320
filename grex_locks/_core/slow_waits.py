"""Logging the waits that last too long, with who holds the lock, at no cost to the rest.

A wait is registered when it starts blocking and unregistered when it ends;
one monitor thread per process sleeps until the oldest registered wait
crosses :data:`SLOW_WAIT_SECONDS`, then logs it once at WARNING with a
diagnosis of the holder. The diagnosis is computed lazily, only if a loguru
handler will emit the line, so a library user who never enables logging
pays one dictionary insert per contended wait and nothing else.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from .undo import Undo
from .waiting import start_daemon

#: A wait longer than this is logged (at WARNING) with who holds the lock.
SLOW_WAIT_SECONDS = 5.0

_ids = itertools.count()
_cond = threading.Condition()
_waits: dict[int, tuple[float, Path, str]] = {}
_monitor: threading.Thread | None = None


def _unknown_holder(path: Path) -> str:
    return "holder unknown"


#: How a slow wait's log line names the holder. The core cannot diagnose (that
#: layer sits above it and imports it); the public layer installs its
#: diagnosis here through :func:`describe_holders_with`.
_describe_holder: Callable[[Path], str] = _unknown_holder


def describe_holders_with(describe: Callable[[Path], str]) -> None:
    """Name the holder of a lock file in slow-wait log lines with ``describe``."""
    global _describe_holder  # noqa: PLW0603 - set once, by the layer above
    _describe_holder = describe


def _holder_of(path: Path) -> str:
    return _describe_holder(path)


def _monitor_loop() -> None:
    reported: set[int] = set()
    while True:
        due: list[tuple[float, Path, str]] = []
        with _cond:
            reported &= _waits.keys()
            now = time.monotonic()
            next_due: float | None = None
            for wait_id, (started, path, kind) in _waits.items():
                if wait_id in reported:
                    continue
                left = started + SLOW_WAIT_SECONDS - now
                if left <= 0:
                    due.append((started, path, kind))
                    reported.add(wait_id)
                elif next_due is None or left < next_due:
                    next_due = left
            if not due:
                # Sleep until the next wait turns slow, or until one is added.
                _cond.wait(next_due)
                continue
        for started, path, kind in due:
            logger.opt(lazy=True).warning(
                "still waiting after {:.1f} s for {} {}: {}",
                lambda started=started: time.monotonic() - started,
                lambda kind=kind: kind,
                lambda path=path: path,
                functools.partial(_holder_of, path),
            )


def watch(undo: Undo, path: Path, kind: str) -> int:
    """Register a blocking wait on ``path`` with the slow-wait monitor; return its id.

    Its removal is registered on ``undo`` first, so an interrupted wait is
    forgotten when the acquire unwinds; :func:`done` forgets it as soon as
    the wait ends normally.
    """
    global _monitor  # noqa: PLW0603 - one monitor thread per process, started lazily
    wait_id = next(_ids)
    undo.callback(done, wait_id)
    with _cond:
        _waits[wait_id] = (time.monotonic(), path, kind)
        if _monitor is None:
            _monitor = start_daemon(_monitor_loop, "grex-locks-slow-waits")
        _cond.notify()
    return wait_id


def done(wait_id: int) -> None:
    """Forget the wait ``wait_id`` (idempotent)."""
    with _cond:
        _waits.pop(wait_id, None)


def reset_after_fork() -> None:
    """In a forked child: no waits in progress, and no monitor thread yet."""
    global _monitor, _cond  # noqa: PLW0603 - recreated after fork, like the gate's mutex
    _cond = threading.Condition()
    _waits.clear()
    _monitor = None


os.register_at_fork(after_in_child=reset_after_fork)
