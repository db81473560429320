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
from pathlib import Path
from types import TracebackType
from typing import Protocol

from . import lockfile, oslock

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


class _CancelWatcher:
    """Sets ``wake`` as soon as ``cancel`` is set, until the wait is over."""

    def __init__(self, cancel: CancelEvent, wake: threading.Event) -> None:
        self._cancel = cancel
        self._wake = wake
        self._done = False
        self._thread = threading.Thread(
            target=self._run, name="grex-locks-cancel-watch", daemon=True
        )

    def __enter__(self) -> _CancelWatcher:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        wake.wait(remaining(deadline))
        return
    if cancel.is_set():
        return
    with _CancelWatcher(cancel, wake):
        wake.wait(remaining(deadline))


def is_cancelled(cancel: CancelEvent | None) -> bool:
    """Whether ``cancel`` is set; a cancel object that fails counts as set."""
    if cancel is None:
        return False
    try:
        return bool(cancel.is_set())
    except Exception:  # noqa: BLE001 - see _CancelWatcher._run
        return True


class KernelWait:
    """A blocking ``flock`` on a private descriptor, run in a helper thread.

    Blocking ``flock`` cannot be interrupted, so a wait with a deadline or a
    cancel event hands it to a helper thread and waits for that thread's
    verdict instead. The helper waits on a descriptor of its own (a fresh
    open file description): if the caller gives up, the helper keeps
    waiting, and when the kernel finally grants it the lock it lets go at
    once — on its own description, so it can never free a lock somebody
    else took later through the lock object.

    Life cycle: construct, register :meth:`settle` as the undo, :meth:`start`,
    wait on :attr:`wake`, ask :meth:`granted`. :meth:`settle` ends it in any
    state: it releases a granted lock, or abandons a wait still in progress.
    """

    def __init__(
        self, fd: int, path: Path, *, shared: bool, wake: threading.Event | None = None
    ) -> None:
        self._handle = [lockfile.reopen(fd, path)]
        self.fd = self._handle[0]
        self.path = path
        self.shared = shared
        self.wake = wake if wake is not None else threading.Event()
        self._mutex = threading.Lock()
        self._started = False
        self._granted = False
        self._settled = False
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start the helper thread's blocking ``flock``."""
        self._started = True
        threading.Thread(target=self._run, name="grex-locks-flock-wait", daemon=True).start()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            oslock.lock_blocking(self.fd, self.path, shared=self.shared)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            error = exc
        with self._mutex:
            if self._settled:
                # The caller is gone: drop what the kernel just granted.
                if error is None:
                    oslock.unlock(self.fd, self.path)
                lockfile.close_once(self._handle)
                return
            self._granted = error is None
            self._error = error
        self.wake.set()

    def granted(self) -> bool:
        """Whether the kernel granted the lock; a failure of the helper's ``flock`` is raised."""
        with self._mutex:
            if self._error is not None:
                raise self._error
            return self._granted

    def settle(self) -> None:
        """Release the lock if granted, else abandon the wait to the helper; idempotent."""
        with self._mutex:
            if self._settled:
                return
            self._settled = True
            helper_done = self._granted or self._error is not None or not self._started
        if helper_done:
            if self._granted:
                oslock.unlock(self.fd, self.path)
            lockfile.close_once(self._handle)
