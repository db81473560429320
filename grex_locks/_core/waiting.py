"""Waiting without polling: deadlines, cancel events, and the kernel wait.

A wait ends for one of three reasons — the lock was granted, the deadline
passed, or the caller's cancel event was set — and each of them must end it
promptly. Threads wait on a :class:`threading.Event` that whoever can end the
wait sets: the releasing thread (in-process hand-off), a helper thread
blocked in ``flock`` (cross-process hand-off), or a watcher blocked in the
cancel object's own ``wait()``. Nothing sleeps and retries.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

#: How long a cancel watcher sleeps inside ``cancel.wait()`` before checking
#: whether its wait is over; it bounds how long an idle watcher thread
#: outlives the acquire, not how fast a cancel is seen.
_WATCHER_LINGER = 0.25


class CancelEvent(Protocol):
    """What ``cancel=`` accepts: ``threading.Event``, a Manager Event, or alike."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = ...) -> bool: ...


def deadline_after(timeout: float | None) -> float | None:
    """Turn a public ``timeout`` into a ``time.monotonic()`` deadline, once, at the edge."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``None``: no deadline), never negative."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _surface_interrupt(exc: RuntimeError) -> BaseException:
    """The KeyboardInterrupt behind a CPython threading error it caused, else ``exc``.

    A ``KeyboardInterrupt`` landing inside ``threading.Condition`` code (in
    ``Thread.start()`` or ``Event.wait()``) can come out as ``RuntimeError:
    release unlocked lock``; the person pressed Ctrl-C, so they get that back.
    """
    cause = exc.__context__
    if cause is not None and not isinstance(cause, Exception):
        return cause
    return exc


def _wait(event: threading.Event, timeout: float | None) -> None:
    try:
        event.wait(timeout)
    except RuntimeError as exc:
        raise _surface_interrupt(exc) from None


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread; an interrupt that breaks its start surfaces as itself."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:
        raise _surface_interrupt(exc) from None
    return thread


class _CancelWatcher:
    """Sets ``wake`` as soon as ``cancel`` is set, until :meth:`stop`."""

    def __init__(self, cancel: CancelEvent, wake: threading.Event) -> None:
        self._cancel = cancel
        self._wake = wake
        self._done = False

    def start(self) -> None:
        start_daemon(self._run, "grex-locks-cancel-watch")

    def stop(self) -> None:
        self._done = True

    def _run(self) -> None:
        while not self._done and not self._wake.is_set():
            try:
                if self._cancel.wait(_WATCHER_LINGER):
                    self._wake.set()
                    return
            except Exception:  # noqa: BLE001 - a broken cancel object (a dead Manager) ends the wait
                self._wake.set()
                return


def wait_for(wake: threading.Event, deadline: float | None, cancel: CancelEvent | None) -> None:
    """Block until ``wake`` is set, ``deadline`` passes, or ``cancel`` is set.

    The caller decides afterwards, under its own mutex, which of them it was.
    """
    if cancel is None:
        _wait(wake, remaining(deadline))
        return
    if cancel.is_set():
        return
    watcher = _CancelWatcher(cancel, wake)
    try:
        # Inside the try: an interruption while the thread starts must still
        # stop it, or it would watch the cancel event forever.
        watcher.start()
        _wait(wake, remaining(deadline))
    finally:
        watcher.stop()


def is_cancelled(cancel: CancelEvent | None) -> bool:
    """Whether ``cancel`` is set; a cancel object that fails counts as set."""
    if cancel is None:
        return False
    try:
        return bool(cancel.is_set())
    except Exception:  # noqa: BLE001 - see _CancelWatcher._run
        return True
