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
import os
import threading
import time
from typing import Protocol

from . import slow_waits
from .threads import start_daemon, surface_interrupt

#: How long a cancel watcher sleeps inside ``cancel.wait()`` before checking
#: whether any wait still needs it; it bounds how long an idle watcher thread
#: outlives the last wait on its cancel object (a later wait reuses it), not
#: how fast a cancel is seen.
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


class NearDeadline(Protocol):
    """Work a wait with a deadline does shortly before it, in the waiting thread (see wait_for)."""

    #: How many seconds before the deadline it is called.
    @property
    def lead(self) -> float: ...

    def __call__(self) -> object: ...


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


class _CancelWatch:
    """One thread watching one cancel object for every wait in this process that uses it.

    A retry loop of short waits with ``cancel=`` would otherwise start a
    watcher per try, each lingering in ``cancel.wait()`` for up to
    :data:`_WATCHER_LINGER` (and, for a Manager ``Event``, each holding a
    connection to the manager). The thread marks itself running; a wait
    that finds none running starts one (an extra one, started while another
    was getting going, sees that and ends at once).
    """

    __slots__ = ("cancel", "thread", "wakes")

    def __init__(self, cancel: CancelEvent) -> None:
        self.cancel = cancel
        self.wakes: set[Waitable] = set()
        self.thread: int | None = None

    def run(self) -> None:
        with _watch_mutex:
            if self.thread is not None:
                return
            self.thread = _thread.get_ident()
        while True:
            with _watch_mutex:
                if not self.wakes:
                    self._forget()
                    return
            try:
                cancelled = bool(self.cancel.wait(_WATCHER_LINGER))
            except Exception:  # noqa: BLE001 - a broken cancel object (a dead Manager) ends the waits
                cancelled = True
            if cancelled:
                with _watch_mutex:
                    wakes = list(self.wakes)
                    self._forget()
                for wake in wakes:
                    wake.set()
                return

    def _forget(self) -> None:
        # Under _watch_mutex. A wait registered later starts a new watch.
        self.thread = None
        if _watches.get(id(self.cancel)) is self:
            del _watches[id(self.cancel)]


_watch_mutex = threading.Lock()
#: The watch of each cancel object in use, by ``id()`` (the watch keeps the
#: object alive, so the id cannot be reused meanwhile).
_watches: dict[int, _CancelWatch] = {}


def _watch(cancel: CancelEvent, wake: Waitable) -> None:
    """Have ``wake`` set as soon as ``cancel`` is set, until :func:`_unwatch`."""
    with _watch_mutex:
        watch = _watches.get(id(cancel))
        if watch is None:
            watch = _watches[id(cancel)] = _CancelWatch(cancel)
        watch.wakes.add(wake)
        running = watch.thread is not None
    if not running:
        start_daemon(watch.run, "grex-locks-cancel-watch")


def _unwatch(cancel: CancelEvent, wake: Waitable) -> None:
    with _watch_mutex:
        watch = _watches.get(id(cancel))
        if watch is not None:
            watch.wakes.discard(wake)


def _renew_watches() -> None:
    global _watch_mutex  # noqa: PLW0603 - a parent thread may have held it at the fork
    _watch_mutex = threading.Lock()
    _watches.clear()


os.register_at_fork(after_in_child=_renew_watches)


def wait_for(
    wake: Waitable,
    deadline: float | None,
    cancel: CancelEvent | None,
    watch: tuple[object, str] | None = None,
    near_deadline: NearDeadline | None = None,
) -> None:
    """Block until ``wake`` is set, ``deadline`` passes, or ``cancel`` is set.

    The one way grex_locks waits for an event. The caller decides afterwards,
    under its own mutex, which of them it was. ``watch`` (the lock file and
    what it is) registers the wait with the slow-wait log while it lasts.
    ``near_deadline`` is called once, in the waiting thread, when the wait is
    still going ``near_deadline.lead`` seconds before its deadline: work the
    caller would otherwise do after the deadline (describing the holder, for
    the error) is done while the wait runs out.
    """
    if cancel is not None and is_cancelled(cancel):
        return
    with slow_waits.watching(watch):
        if cancel is None:
            _wait_until(wake, deadline, near_deadline)
            return
        try:
            # Inside the try: an interruption anywhere in it (the thread's
            # start included) must still unregister, or the cancel object
            # would be watched for nobody until it is set.
            _watch(cancel, wake)
            _wait_until(wake, deadline, near_deadline)
        finally:
            _unwatch(cancel, wake)


def _wait_until(wake: Waitable, deadline: float | None, near_deadline: NearDeadline | None) -> None:
    if deadline is not None and near_deadline is not None:
        _wait(wake, max(0.0, deadline - near_deadline.lead - time.monotonic()))
        if wake.is_set():
            return
        near_deadline()
    _wait(wake, remaining(deadline))


def is_cancelled(cancel: CancelEvent | None) -> bool:
    """Whether ``cancel`` is set; a cancel object that fails counts as set."""
    if cancel is None:
        return False
    try:
        return bool(cancel.is_set())
    except Exception:  # noqa: BLE001 - see _CancelWatcher._run
        return True
