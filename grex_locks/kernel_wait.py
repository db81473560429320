"""Waiting in the kernel for a flock, from a helper thread that can be left behind.

Blocking ``flock`` cannot be interrupted, so a wait with a deadline or a
cancel event hands the ``flock`` to a helper thread and waits for that
thread's verdict instead. The helper waits on a descriptor of its own (a
fresh open file description): if the caller gives up, the helper keeps
waiting, and when the kernel finally grants it the lock it lets go at once —
on its own description, so it can never free a lock somebody else took later
through the lock object.

A helper left behind is not wasted: the next wait on the same file and mode
in this process takes it over instead of starting another thread. A retry
loop of short timeouts against a lock held for an hour therefore keeps one
helper thread and one descriptor, not one per attempt.
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import lockfile, oslock
from .lockfile import FileKey

_IdleKey = tuple[FileKey, bool]
_idle_mutex = threading.Lock()
_idle: dict[_IdleKey, list[KernelWait]] = {}


class KernelWait:
    """A blocking ``flock`` on a private descriptor, run in a helper thread.

    Life cycle: get one from :func:`kernel_wait`, register :meth:`settle` as
    the undo, :meth:`start`, wait on :attr:`wake`, ask :meth:`granted`.
    :meth:`settle` ends it in any state: it releases a granted lock, or leaves
    a wait still in progress to the helper (or to the next waiter).
    """

    def __init__(
        self, fd: int, path: Path, key: FileKey, *, shared: bool, wake: threading.Event
    ) -> None:
        self._handle = [lockfile.reopen(fd, path)]
        self.fd = self._handle[0]
        self.path = path
        self.key = key
        self.shared = shared
        self.wake = wake
        self._mutex = threading.Lock()
        self._started = False
        self._finished = False
        self._granted = False
        self._settled = False
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start the helper thread's blocking ``flock`` (a taken-over wait runs already)."""
        if self._started:
            return
        self._started = True
        threading.Thread(target=self._run, name="grex-locks-flock-wait", daemon=True).start()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            oslock.lock_blocking(self.fd, self.path, shared=self.shared)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            error = exc
        with self._mutex:
            self._finished = True
            abandoned = self._settled
            if not abandoned:
                self._granted = error is None
                self._error = error
        if not abandoned:
            self.wake.set()
            return
        # Nobody wants it any more: drop what the kernel just granted.
        _forget_idle(self)
        if error is None:
            oslock.unlock(self.fd, self.path)
        lockfile.close_once(self._handle)

    def granted(self) -> bool:
        """Whether the kernel granted the lock; a failure of the helper's ``flock`` is raised."""
        with self._mutex:
            if self._error is not None:
                raise self._error
            return self._granted

    def settle(self) -> None:
        """Release the lock if granted, else leave the wait behind; idempotent."""
        with self._mutex:
            if self._settled:
                return
            self._settled = True
            running = self._started and not self._finished
        if running:
            with _idle_mutex:
                _idle.setdefault((self.key, self.shared), []).append(self)
            return
        if self._granted:
            oslock.unlock(self.fd, self.path)
        lockfile.close_once(self._handle)

    def _take_over(self, wake: threading.Event) -> bool:
        with self._mutex:
            if not self._settled or self._finished:
                return False
            self._settled = False
            self.wake = wake
            return True


def kernel_wait(
    fd: int, path: Path, key: FileKey, *, shared: bool, wake: threading.Event | None = None
) -> KernelWait:
    """A kernel wait on the file behind ``fd``: one left behind and still blocked, or a new one."""
    wake = wake if wake is not None else threading.Event()
    with _idle_mutex:
        idle = _idle.get((key, shared))
        while idle:
            candidate = idle.pop()
            if not idle:
                del _idle[(key, shared)]
            if candidate._take_over(wake):
                return candidate
            idle = _idle.get((key, shared))
    return KernelWait(fd, path, key, shared=shared, wake=wake)


def _forget_idle(wait: KernelWait) -> None:
    with _idle_mutex:
        idle = _idle.get((wait.key, wait.shared))
        if idle and wait in idle:
            idle.remove(wait)
            if not idle:
                del _idle[(wait.key, wait.shared)]


def idle_count() -> int:
    """How many left-behind helper threads are still blocked in ``flock``."""
    with _idle_mutex:
        return sum(len(waits) for waits in _idle.values())


def reset_after_fork() -> None:
    """In a forked child: the helper threads do not exist; their descriptors are closed."""
    global _idle_mutex  # noqa: PLW0603 - recreated after fork, like the gate's mutex
    _idle_mutex = threading.Lock()
    _idle.clear()
