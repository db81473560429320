"""Waiting without polling: deadlines, cancel events, and the kernel wait.

A wait ends for one of three reasons — the lock was granted, the deadline
passed, or the caller's cancel event was set — and each of them must end it
promptly. Threads wait on a :class:`threading.Event` that whoever can end the
wait sets: the releasing thread (in-process hand-off), a helper thread
blocked in ``flock`` (cross-process hand-off), or a watcher blocked in the
cancel object's own ``wait()``. Nothing sleeps and retries.
"""

from __future__ import annotations

import _thread
import contextlib
import math
import time
from typing import Protocol

from . import slow_waits
from .threads import start_daemon, surface_interrupt

#: How long a cancel watcher sleeps inside ``cancel.wait()`` before checking
#: whether its wait is over; it bounds how long an idle watcher thread
#: outlives the acquire, not how fast a cancel is seen.
_WATCHER_LINGER = 0.25


class Waitable(Protocol):
    """What a waiter blocks on: a :class:`Wake`, or a ``threading.Event``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = ...) -> bool: ...


class Wake:
    """A wake-up for a waiting thread: lighter than ``threading.Event``, and safe from Ctrl-C.

    ``Event.wait`` runs a ``Condition`` in Python (a new lock, a waiter list,
    two more acquisitions) on every hand-off; this is one C-level lock that
    the waiter blocks on and the waker releases. A ``Condition`` can also be
    left locked for good by a ``KeyboardInterrupt`` landing inside its
    Python-level ``__enter__``, after which every ``set()`` or ``wait()`` on it
    blocks forever; a C-level lock cannot. Setting it twice is harmless;
    once set it stays set for every waiter, until :meth:`clear`.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        """Wake the waiters (now, or as soon as they wait)."""
        self._set = True
        with contextlib.suppress(RuntimeError):  # set already: one wake-up is all there is
            self._lock.release()

    def is_set(self) -> bool:
        """Whether :meth:`set` has been called (since the last :meth:`clear`)."""
        return self._set

    def clear(self) -> None:
        """Forget a wake-up, for the one thread that waits again after checking why it woke.

        A :meth:`set` racing with this may survive it as a spurious wake-up,
        never be lost: the waiter re-checks its condition after every wake.
        """
        self._set = False
        self._lock.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout`` seconds pass; return whether it was set."""
        if self._set:
            return True
        if self._lock.acquire(True, -1 if timeout is None else timeout):
            self._lock.release()  # stays set for any later wait()
            return True
        return self._set


class CancelEvent(Protocol):
    """What ``cancel=`` accepts: ``threading.Event``, a Manager Event, or alike."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = ...) -> bool: ...


def deadline_after(timeout: float | None) -> float | None:
    """Turn a public ``timeout`` into a ``time.monotonic()`` deadline, once, at the edge.

    ``None`` and ``math.inf`` (or anything longer than a thread can wait)
    mean no deadline; a negative, NaN or non-numeric timeout is a ``ValueError``.
    """
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")
    if timeout >= _thread.TIMEOUT_MAX:
        return None
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``None``: no deadline), never negative."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _wait(event: Waitable, timeout: float | None) -> None:
    try:
        event.wait(timeout)
    except RuntimeError as exc:
        raise surface_interrupt(exc) from None


class _CancelWatcher:
    """Sets ``wake`` as soon as ``cancel`` is set, until :meth:`stop`."""

    def __init__(self, cancel: CancelEvent, wake: Waitable) -> None:
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


def wait_for(
    wake: Waitable,
    deadline: float | None,
    cancel: CancelEvent | None,
    watch: tuple[object, str] | None = None,
) -> None:
    """Block until ``wake`` is set, ``deadline`` passes, or ``cancel`` is set.

    The one way grex_locks waits for an event. The caller decides afterwards,
    under its own mutex, which of them it was. ``watch`` (the lock file and
    what it is) registers the wait with the slow-wait log while it lasts.
    """
    if cancel is not None and is_cancelled(cancel):
        return
    with slow_waits.watching(watch):
        if cancel is None:
            _wait(wake, remaining(deadline))
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
