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
helper thread and one descriptor, not one per attempt. Each taker gets its
own :class:`KernelWait` handle; a handle that has been superseded can no
longer settle (release or abandon) the helper it once owned.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import threading
from pathlib import Path

from . import lock_file as lockfile
from . import os_lock as oslock
from .lock_file import FileKey
from .threads import start_daemon
from .undo import Undo
from .waiting import Waitable, Wake

_IdleKey = tuple[FileKey, bool]
_idle_mutex = threading.Lock()
_idle: dict[_IdleKey, list[_Helper]] = {}
#: How many helper threads are blocked in flock, per lock file (for statistics).
_blocked: dict[FileKey, int] = {}

#: How long a helper whose grant was taken waits for its taker to say it has
#: taken its first steps (see _Helper.run); only an interrupted taker is slower.
TAKER_STEPS_LIMIT = 0.1


class _Helper:
    """The helper thread's side: one blocking flock on a private descriptor."""

    def __init__(self, fd: int, path: Path, key: FileKey, shared: bool) -> None:
        self.handle = [lockfile.reopen(fd, path)]
        self.fd = self.handle[0]
        self.path = path
        self.key = key
        self.shared = shared
        self.mutex = threading.Lock()
        self.owner: KernelWait | None = None
        self.wake: Waitable = Wake()
        #: :meth:`KernelWait.start` has launched the thread (or tried to:
        #: an interruption inside ``Thread.start()`` can leave a thread that
        #: never runs, or one that runs later).
        self.started = False
        #: The thread is running: it will flock and then finish. Only a running
        #: helper is left behind for a later taker, who would otherwise wait
        #: for a thread that never comes.
        self.running = False
        self.finished = False
        self.granted = False
        self.error: BaseException | None = None
        #: Released once the taker of a grant has taken its first steps.
        self.taker_done = _thread.allocate_lock()
        self.taker_done.acquire()

    def run(self) -> None:
        error: BaseException | None = None
        with self.mutex:
            if self.owner is None:
                # Settled before this thread ran (a helper has an owner from
                # its creation until then): its descriptor is being closed,
                # so a thread that starts late must not touch it.
                return
            self.running = True
        with _idle_mutex:
            _blocked[self.key] = _blocked.get(self.key, 0) + 1
        try:
            oslock.lock_blocking(self.fd, self.path, shared=self.shared)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            error = exc
        finally:
            with _idle_mutex:
                _blocked[self.key] -= 1
                if not _blocked[self.key]:
                    del _blocked[self.key]
        with self.mutex:
            self.finished = True
            abandoned = self.owner is None
            if not abandoned:
                self.granted = error is None
                self.error = error
            wake = self.wake
        if not abandoned:
            wake.set()
            # The woken caller's first steps (its owner record, on caches gone
            # cold while it slept) make system calls, and each of them lets
            # any thread that wants the interpreter have it: this thread's
            # own ending would take it from the caller for about 0.1 ms, on
            # the hand-off's path. So it ends only once the caller is done.
            self.taker_done.acquire(timeout=TAKER_STEPS_LIMIT)
            return
        # Nobody wants it any more: drop what the kernel just granted.
        _forget_idle(self)
        if error is None:
            oslock.unlock(self.fd, self.path)
        lockfile.close_once(self.handle)


class KernelWait:
    """One caller's claim on a helper's blocking ``flock``.

    Life cycle: get one from :func:`kernel_wait` (which registers
    :meth:`settle` as an undo), :meth:`start`, wait on :attr:`wake`, ask
    :meth:`granted`.
    :meth:`settle` ends the claim in any state: it releases a granted lock,
    or leaves a wait still in progress to the helper (or to the next taker).
    It is idempotent, and does nothing once another taker owns the helper.
    """

    def __init__(self, helper: _Helper, wake: Waitable) -> None:
        self._helper = helper
        self.wake = wake
        self.fd = helper.fd
        self._finishing = False

    def start(self) -> None:
        """Start the helper thread's blocking ``flock`` (a taken-over one runs already)."""
        helper = self._helper
        with helper.mutex:
            if helper.started or helper.owner is not self:
                return
            helper.started = True
        start_daemon(helper.run, "grex-locks-flock-wait")

    def granted(self) -> bool:
        """Whether the kernel granted this claim the lock; a failed ``flock`` is raised."""
        helper = self._helper
        with helper.mutex:
            if helper.owner is not self:
                return False
            if helper.error is not None:
                raise helper.error
            return helper.granted

    def taken(self) -> None:
        """Say that the caller has taken its first steps after the grant: the helper may end."""
        with contextlib.suppress(RuntimeError):  # said already
            self._helper.taker_done.release()

    def settle(self) -> None:
        """Release the lock if granted, else leave the wait behind; idempotent.

        Resumable too: a settle cut short by an interruption after it took
        the release branch redoes the (idempotent) unlock and close when the
        undo runs it again.
        """
        helper = self._helper
        with helper.mutex:
            if helper.owner is self:
                self.taken()
                helper.owner = None
                leave_behind = helper.running and not helper.finished
                self._finishing = not leave_behind
            elif not self._finishing:
                return
            else:
                leave_behind = False
        if leave_behind:
            with _idle_mutex:
                _idle.setdefault((helper.key, helper.shared), []).append(helper)
            return
        if helper.handle:
            if helper.granted:
                oslock.unlock(helper.fd, helper.path)
            lockfile.close_once(helper.handle)


def _claim(helper: _Helper, wake: Waitable, undo: Undo) -> KernelWait | None:
    with helper.mutex:
        if helper.owner is not None or helper.finished:
            return None
        claim = KernelWait(helper, wake)
        # Registered before the claim owns anything: an interruption right
        # after leaves an unowned helper, which drops the lock when granted.
        undo.push(claim.settle)
        helper.owner = claim
        helper.wake = wake
        return claim


def kernel_wait(
    fd: int,
    path: Path,
    key: FileKey,
    undo: Undo,
    *,
    shared: bool,
    wake: Waitable | None = None,
) -> KernelWait:
    """Claim a kernel wait for the file behind ``fd``: a left-behind helper, or a new one.

    The claim's :meth:`KernelWait.settle` is registered on ``undo``.
    """
    wake = wake if wake is not None else Wake()
    with _idle_mutex:
        idle = _idle.get((key, shared), [])
        while idle:
            claim = _claim(idle.pop(), wake, undo)
            if claim is not None:
                return claim
        _idle.pop((key, shared), None)
    helper = _Helper(fd, path, key, shared)
    claim = _claim(helper, wake, undo)
    if claim is None:  # pragma: no cover - a new helper has no owner and has not run
        raise RuntimeError("a new kernel wait could not be claimed")
    return claim


def _forget_idle(helper: _Helper) -> None:
    with _idle_mutex:
        idle = _idle.get((helper.key, helper.shared))
        if idle and helper in idle:
            idle.remove(helper)
            if not idle:
                del _idle[(helper.key, helper.shared)]


def blocked_on(key: FileKey) -> int:
    """How many helper threads of this process are blocked in ``flock`` on ``key`` now."""
    return _blocked.get(key, 0)


def idle_count() -> int:
    """How many left-behind helper threads are still blocked in ``flock``."""
    with _idle_mutex:
        return sum(len(helpers) for helpers in _idle.values())


def reset_after_fork() -> None:
    """In a forked child: the helper threads do not exist; their descriptors are closed."""
    global _idle_mutex  # noqa: PLW0603 - recreated after fork, like the gate's mutex
    _idle_mutex = threading.Lock()
    _idle.clear()
    _blocked.clear()


os.register_at_fork(after_in_child=reset_after_fork)
