"""The one lock primitive behind all five grex locks.

Every acquire, whatever the lock, runs the same pipeline, and every release
runs it backwards::

    re-entry check -> tier check -> in-process gate -> flock -> owner record
         (LockBusy)  (TierViolation)   (threads wait)  (processes wait)

Each step registers its own undo on an :class:`~grex_locks._core.undo.Undo`
stack before it acts, so an exception at any point — a timeout,
``KeyboardInterrupt`` — unwinds exactly what was done, and a release is
nothing but closing that stack. The five lock classes only choose the
arguments: where the file is, shared or exclusive, wait or fail fast, and the
tier.

Lifetime: a hold's stack is kept alive by :mod:`~grex_locks._core.undo` until
it is released, so a lock stays held until release or process exit even if
the program drops every reference to it. Fork: a lock object used in a
forked child notices the new generation and starts afresh (its descriptor
was closed without unlocking); a hold inherited from the parent is disarmed.

The core refuses quietly: :meth:`LockCore.take` returns ``None`` when the lock
was not granted, and the public layer above builds the error (with a
diagnosis of the holder) for its caller.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from threading import get_ident
from typing import NoReturn

from grex_locks.errors import LockBusy, LockIOError

from . import lock_file as lockfile
from . import os_lock as oslock
from . import slow_waits
from .fair_queue import Ticket, queue_for
from .fork import generation
from .kernel_wait import KernelWait
from .kernel_wait import kernel_wait as kernel_wait_for
from .owner_record import RecordFile
from .tiers import Tier, enter_tier
from .undo import Undo, UndoHandle
from .waiting import CancelEvent, is_cancelled, remaining, wait_for


class Hold(UndoHandle):
    """One acquisition of a lock; a context manager that releases it on exit."""

    __slots__ = ("_core", "fd", "shared")

    def __init__(self, core: LockCore, shared: bool, fd: int, undo: Undo) -> None:
        super().__init__(undo, core.kind)
        self._core = core
        self.shared = shared
        self.fd = fd

    @property
    def thread(self) -> int:
        """The identity of the thread that took this hold (the only one that may release it)."""
        return self._thread

    @property
    def inherited(self) -> bool:
        """Whether this hold was taken by the parent of this (forked) process."""
        return self._generation != generation.value

    @property
    def core_path(self) -> Path:
        """The lock file this hold is on."""
        return self._core.path

    def release(self) -> None:
        """Release this hold; only the thread that acquired it may.

        In a forked child, releasing (or dropping, or leaving the ``with`` of)
        a hold inherited from the parent does nothing, however often: the lock
        is the parent's. (Its undo stack, disarmed, is dropped unrun.)
        """
        if self._generation != generation.value:
            self._undo = None
            return
        self._core.release_hold(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"a hold of {self._core.kind} {self._core.path} belongs to the thread that took "
            "it and cannot be sent to another process; send the lock object itself "
            "(it arrives as a fresh, unheld lock)"
        )


class LockCore:
    """A lock file, opened once, that threads and processes take in turn.

    ``kind`` names the lock in messages ("pack lock"); ``busy_error`` is the
    class raised when the lock is held and the caller may not wait.
    """

    def __init__(
        self,
        lock_path: Path,
        *,
        tier: Tier,
        kind: str,
        busy_error: type[LockBusy] = LockBusy,
    ) -> None:
        self.path = lock_path
        self.tier = tier
        self.kind = kind
        self.busy_error = busy_error
        self._fd: int | None = lockfile.open_lock_file(lock_path)
        self.key = lockfile.file_key(self._fd)
        #: Threads of this process queue here, first come first served, before flock.
        self.queue = queue_for(self.key)
        self._watch = (lock_path, kind)
        self._record = RecordFile(lock_path)
        self.record_path = self._record.path
        self._generation = generation.value
        self._fd_claim: object | None = None
        self._fd_mutex = threading.Lock()
        self._holds: dict[int, Hold] = {}

    def _renew_if_forked(self) -> None:
        """In a forked child: hold nothing, and reopen the file on next use.

        The inherited descriptor was closed (without unlocking) as the child
        started; the mutex may have been held by a parent thread that does
        not exist here; the holds are the parent's.
        """
        if self._generation != generation.value:
            self._generation = generation.value
            self._fd = None
            self._fd_claim = None
            self._fd_mutex = threading.Lock()
            self._holds = {}

    def __del__(self) -> None:
        # A lock object owns its descriptors: a run over 100,000 packs must not
        # keep 100,000 files open. (A held object is kept alive by its hold.)
        # In a forked child they were closed already, and their numbers may
        # since belong to other files.
        if getattr(self, "_generation", None) != generation.value or self._holds:
            return
        fd, self._fd = self._fd, None
        if fd is not None:
            lockfile.close(fd)
        self._record.close()

    # -- state ---------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now (in any thread of this process)."""
        self._renew_if_forked()
        return bool(self._holds)

    def hold_of_current_thread(self) -> Hold | None:
        """The calling thread's hold through this object, if any."""
        self._renew_if_forked()
        return self._holds.get(threading.get_ident())

    # -- the one acquire path ------------------------------------------------

    def held_by_current_thread(self) -> bool:
        """Whether the calling thread holds this lock file, through this object or another."""
        self._renew_if_forked()
        me = get_ident()
        return me in self._holds or self.queue.held_by(me)

    def refuse_reentry(self) -> None:
        """Raise ``LockBusy`` if the calling thread already holds this lock file.

        Checked first, before the tier order: taking a lock twice is a
        self-deadlock whatever the tiers say.
        """
        if self.held_by_current_thread():
            raise self._reentry_error()

    def _reentry_error(self) -> LockBusy:
        return self.busy_error(
            self.path,
            f"{self.kind} {self.path} is already held by this thread "
            "(taking it again would deadlock on itself)",
        )

    def take(
        self,
        *,
        shared: bool = False,
        wait: bool = True,
        deadline: float | None = None,
        cancel: CancelEvent | None = None,
        tier_taken: bool = False,
        granted_wait: KernelWait | None = None,
    ) -> Hold | None:
        """Take the lock, or return ``None`` if it was not granted; see the module docstring.

        Not granted means busy (``wait`` false), the deadline passed, or
        ``cancel`` was set; the caller tells which. Same-thread re-entry
        raises ``LockBusy``, tier violations ``TierViolation``, OS refusals
        ``LockIOError``. ``tier_taken`` says the caller (``acquire_all``, a
        scheduler) already entered this lock's tier once for a whole group.
        ``granted_wait`` is a kernel wait of the caller's that the kernel
        already granted (a scheduler waiting for any of its slots): the hold
        adopts its descriptor, and releases it with the hold — or at once,
        if the acquire fails.
        """
        if self._generation != generation.value:
            self._renew_if_forked()
        if cancel is not None and is_cancelled(cancel):
            if granted_wait is not None:
                granted_wait.settle()
            return None
        me = get_ident()
        queue = self.queue
        if me in self._holds or (queue._holders and queue.held_by(me)):
            raise self._reentry_error()
        ticket = Ticket(me, not shared)
        undo = Undo()
        # Each step's undo goes on the stack *before* the step acts, so that
        # an exception at any point (KeyboardInterrupt included) unwinds
        # exactly what was done. First in, so last out: a release cut short
        # leaves the hold findable, and release() again finishes it.
        push = undo._steps.append  # Undo.push without the call: this is the hot path
        try:
            push((self._holds.pop, (me, None)))
            if granted_wait is not None:
                push((granted_wait.settle, ()))
            if not tier_taken:
                enter_tier(undo, self.tier, self.path)
            queue = self.queue
            push((queue.leave, (ticket,)))
            if not queue.enter(
                ticket, wait=wait, deadline=deadline, cancel=cancel, watch=self._watch
            ):
                undo.close_fully()
                return None
            if granted_wait is not None:
                fd: int | None = granted_wait.fd
            else:
                fd = self._lock_os(undo, shared=shared, wait=wait, deadline=deadline, cancel=cancel)
            if fd is None:
                undo.close_fully()
                return None
            if not shared:
                record = self._record
                push((record.blank, ()))
                record.write(self.tier)
            hold = Hold(self, shared, fd, undo)
            self._holds[me] = hold
            undo.keep()
        except BaseException:
            undo.close_quietly()
            raise
        return hold

    def _lock_os(
        self,
        undo: Undo,
        *,
        shared: bool,
        wait: bool,
        deadline: float | None,
        cancel: CancelEvent | None,
    ) -> int | None:
        """Take the flock; return the descriptor that holds it, or None if not granted."""
        # This object's descriptor, or a private one while another thread uses
        # it: two holds must never share an open file description (unlocking
        # one would unlock the other).
        fd = self._fd if self._fd is not None else self.descriptor()
        token = object()
        with self._fd_mutex:
            claimed = self._fd_claim is None
            if claimed:
                undo._steps.append((self._free_descriptor, (token,)))
                self._fd_claim = token
        if not claimed:
            handle = [lockfile.reopen(fd, self.path)]
            undo.push(lockfile.close_once, handle)
            fd = handle[0]
        # Registered before locking, so no interruption can leave the lock
        # taken with no undo; unlocking our own unlocked description is harmless.
        undo._steps.append((oslock.unlock, (fd, self.path)))
        if oslock.try_lock(fd, self.path, shared=shared):
            return fd
        if not wait or remaining(deadline) == 0.0:
            undo._steps.pop()  # the unlock: this description holds nothing to let go
            return None
        if deadline is None and cancel is None:
            # Nothing can end this wait but the kernel's grant, so block in the
            # kernel directly: the fastest hand-off there is.
            with slow_waits.watching(self._watch):
                oslock.lock_blocking(fd, self.path, shared=shared)
            return fd
        kernel_wait = kernel_wait_for(fd, self.path, self.key, undo, shared=shared)
        kernel_wait.start()
        wait_for(kernel_wait.wake, deadline, cancel, self._watch)
        return kernel_wait.fd if kernel_wait.granted() else None

    def busy_elsewhere(self) -> bool:
        """Whether the lock file is held right now through another open file; False if unsure.

        One non-blocking ``flock`` on this object's idle descriptor, undone at
        once: a refusal that costs two system calls, for callers that try many
        locks and take the first free one (a scheduler's slots), where a whole
        :meth:`take` per busy slot would cost ten times more. False (take it
        and see) whenever a thread of this process uses the lock file.
        """
        if self._generation != generation.value:
            self._renew_if_forked()
        fd = self._fd
        if fd is None or self._fd_claim is not None or self.queue._holders:
            return False
        token = object()
        with self._fd_mutex:
            if self._fd_claim is not None:
                return False
            self._fd_claim = token
        try:
            return not oslock.try_lock(fd, self.path, shared=False)
        finally:
            # Unlocked whether or not the attempt got it (an interruption may
            # land between the grant and the return): nothing else uses this
            # description while it is claimed, so this unlocks nobody else.
            with contextlib.suppress(LockIOError):
                oslock.unlock(fd, self.path)
            self._free_descriptor(token)

    def descriptor(self) -> int:
        """This object's descriptor on the lock file, reopened if a fork closed it."""
        self._renew_if_forked()
        if self._fd is None:
            self._fd = lockfile.open_lock_file(self.path)
        return self._fd

    def _free_descriptor(self, token: object) -> None:
        with self._fd_mutex:
            if self._fd_claim is token:
                self._fd_claim = None

    # -- the one release path ------------------------------------------------

    def release_hold(self, hold: Hold | None = None) -> None:
        """Release the calling thread's hold (or ``hold``), undoing its acquire in reverse."""
        if self._generation != generation.value:
            self._renew_if_forked()
        me = get_ident()
        current = self._holds.get(me)
        if hold is None:
            hold = current
        if hold is None or hold._undo is None:
            if self._holds and current is None:
                raise self._not_this_thread()
            raise RuntimeError(f"cannot release {self.kind} {self.path}: it is not held here")
        if hold.thread != me:
            raise self._not_this_thread()
        # A hold whose release was cut short still has its undo: this call
        # finishes it (or, if only the last bookkeeping was cut, just ends it).
        hold._close_undo()

    def _not_this_thread(self) -> RuntimeError:
        return RuntimeError(
            f"{self.kind} {self.path} is held by another thread; "
            "only the thread that acquired it may release it"
        )

    def release_if_held(self) -> None:
        """Release the calling thread's hold if it has one (an idempotent undo step)."""
        if self.hold_of_current_thread() is not None:
            self.release_hold()
