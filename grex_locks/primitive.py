"""The one lock primitive behind all five grex locks.

Every acquire, whatever the lock, runs the same pipeline, and every release
runs it backwards::

    re-entry check -> tier check -> in-process gate -> flock -> owner record
         (LockBusy)  (TierViolation)   (threads wait)  (processes wait)

Each step registers its own undo on an :class:`~grex_locks.undo.Undo` stack the
moment it succeeds, so an exception at any point — a timeout, a refused
record write, ``KeyboardInterrupt`` — unwinds exactly what was done, and a
release is nothing but closing that stack. The five lock classes only choose
the arguments: where the file is, shared or exclusive, wait or fail fast,
and the tier.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from . import gate, lockfile, oslock, owner_record, slow_waits
from .errors import LockBusy, LockCancelled, LockTimeout
from .tiers import Tier, enter_tier
from .undo import Undo
from .waiting import CancelEvent, KernelWait, is_cancelled, remaining, wait_for

if TYPE_CHECKING:
    from .diagnosis import Diagnosis

_live_cores: weakref.WeakSet[LockCore] = weakref.WeakSet()


def _diagnose(path: Path) -> Diagnosis | None:
    """Best-effort diagnosis for an error message; an error must not fail to build."""
    try:
        from .diagnosis import diagnose  # noqa: PLC0415 - diagnostics import the core

        return diagnose(path)
    except Exception:  # noqa: BLE001 - a diagnosis is a courtesy, never a second failure
        return None


class Hold:
    """One acquisition of a lock; a context manager that releases it on exit."""

    __slots__ = ("_core", "_undo", "fd", "shared", "thread")

    def __init__(self, core: LockCore, thread: int, shared: bool, fd: int) -> None:
        self._core = core
        self.thread = thread
        self.shared = shared
        self.fd = fd
        self._undo: Undo | None = None

    @property
    def core_path(self) -> Path:
        """The lock file this hold is on."""
        return self._core.path

    def release(self) -> None:
        """Release this hold; only the thread that acquired it may."""
        self._core.release_hold(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
        self.record_path = owner_record.record_path(lock_path)
        self.busy_error = busy_error
        self._fd: int | None = lockfile.open_lock_file(lock_path)
        self.key = lockfile.file_key(self._fd)
        self._fd_busy = False
        self._fd_mutex = threading.Lock()
        self._holds: dict[int, Hold] = {}
        _live_cores.add(self)

    def __del__(self) -> None:
        # A lock object owns its descriptor: a run over 100,000 packs must not
        # keep 100,000 files open. (A held object is kept alive by its hold.)
        fd = getattr(self, "_fd", None)
        if fd is not None and not getattr(self, "_holds", None):
            self._fd = None
            lockfile.close(fd)

    # -- state ---------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now (in any thread)."""
        return bool(self._holds)

    def hold_of_current_thread(self) -> Hold | None:
        """The calling thread's hold through this object, if any."""
        return self._holds.get(threading.get_ident())

    # -- the one acquire path ------------------------------------------------

    def acquire(
        self,
        *,
        shared: bool = False,
        wait: bool = True,
        deadline: float | None = None,
        cancel: CancelEvent | None = None,
        tier_taken: bool = False,
        locked_fd: int | None = None,
    ) -> Hold:
        """Take the lock; see the module docstring for the pipeline.

        ``tier_taken`` says the caller (``acquire_all``, a scheduler) already
        entered this lock's tier once for a whole group. ``locked_fd`` is a
        private descriptor on which the caller's own kernel wait was already
        granted the flock (a scheduler waiting for any of its slots); the hold
        adopts it once admitted by the gate, and closes it on release or on a
        later failure. If the gate refuses (``LockBusy``), it stays the caller's.
        """
        if is_cancelled(cancel):
            raise LockCancelled(self.path, f"acquiring {self.kind} {self.path} was cancelled")
        me = threading.get_ident()
        if me in self._holds or gate.held_by_current_thread(self.key):
            raise self.busy_error(
                self.path,
                f"{self.kind} {self.path} is already held by this thread "
                "(taking it again would deadlock on itself)",
            )
        started = time.monotonic()
        with Undo() as undo:
            if not tier_taken:
                enter_tier(undo, self.tier, self.path)
            try:
                gate.enter(
                    undo,
                    self.key,
                    shared=shared,
                    wait=wait,
                    deadline=deadline,
                    cancel=cancel,
                    watch=(self.path, self.kind),
                )
            except gate.NotAdmitted as refusal:
                raise self._refusal(refusal.outcome, started, cancel) from None
            if locked_fd is not None:
                undo.callback(lockfile.close, locked_fd)
                undo.callback(oslock.unlock, locked_fd, self.path)
                fd: int | None = locked_fd
            else:
                fd = self._lock_os(undo, shared=shared, wait=wait, deadline=deadline, cancel=cancel)
            if fd is None:
                outcome = gate.GateOutcome.BUSY if not wait else gate.GateOutcome.TIMEOUT
                if wait and is_cancelled(cancel):
                    outcome = gate.GateOutcome.CANCELLED
                raise self._refusal(outcome, started, cancel)
            if not shared:
                written = owner_record.write_record(self.record_path, self.tier)
                undo.callback(owner_record.clear_record, written)
            hold = Hold(self, me, shared, fd)
            undo.callback(self._holds.pop, me, None)
            self._holds[me] = hold
            hold._undo = undo.pop_all()
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
        fd = self._take_descriptor(undo)
        if oslock.try_lock(fd, self.path, shared=shared):
            undo.callback(oslock.unlock, fd, self.path)
            return fd
        if not wait or remaining(deadline) == 0.0:
            return None
        if deadline is None and cancel is None:
            # Nothing can end this wait but the kernel's grant, so block in the
            # kernel directly: the fastest hand-off there is.
            try:
                with slow_waits.watching(self.path, self.kind):
                    oslock.lock_blocking(fd, self.path, shared=shared)
            except BaseException:
                oslock.unlock(fd, self.path)  # our own description: harmless if not granted
                raise
            undo.callback(oslock.unlock, fd, self.path)
            return fd
        kernel_wait = KernelWait(fd, self.path, shared=shared)
        try:
            with slow_waits.watching(self.path, self.kind):
                wait_for(kernel_wait.wake, deadline, cancel)
        except BaseException:
            if kernel_wait.claim():
                oslock.unlock(kernel_wait.fd, self.path)
                lockfile.close(kernel_wait.fd)
            raise
        if not kernel_wait.claim():
            return None
        undo.callback(lockfile.close, kernel_wait.fd)
        undo.callback(oslock.unlock, kernel_wait.fd, self.path)
        return kernel_wait.fd

    def descriptor(self) -> int:
        """This object's descriptor on the lock file, reopened if a fork closed it."""
        if self._fd is None:
            self._fd = lockfile.open_lock_file(self.path)
        return self._fd

    def _take_descriptor(self, undo: Undo) -> int:
        """This object's descriptor, or a private one while another thread uses it.

        Two holds must never share an open file description: unlocking one
        would unlock the other.
        """
        own = self.descriptor()
        with self._fd_mutex:
            claimed = not self._fd_busy
            self._fd_busy = True
        if claimed:
            undo.callback(setattr, self, "_fd_busy", False)
            return own
        fd = lockfile.reopen(own, self.path)
        undo.callback(lockfile.close, fd)
        return fd

    def _refusal(
        self, outcome: str, started: float, cancel: CancelEvent | None
    ) -> LockBusy | LockTimeout | LockCancelled:
        waited = time.monotonic() - started
        if outcome == gate.GateOutcome.CANCELLED:
            return LockCancelled(
                self.path, f"waiting for {self.kind} {self.path} was cancelled after {waited:.3f} s"
            )
        holder = _diagnose(self.path)
        summary = holder.holder_summary() if holder is not None else ""
        clause = f": {summary}" if summary else ""
        if outcome == gate.GateOutcome.BUSY:
            return self.busy_error(self.path, f"{self.kind} {self.path} is busy{clause}", holder)
        return LockTimeout(
            self.path,
            f"timed out after {waited:.3f} s waiting for {self.kind} {self.path}{clause}",
            holder,
            waited,
        )

    # -- the one release path ------------------------------------------------

    def release_hold(self, hold: Hold | None = None) -> None:
        """Release the calling thread's hold (or ``hold``), undoing its acquire in reverse."""
        me = threading.get_ident()
        current = self._holds.get(me)
        if hold is None:
            hold = current
        if hold is None or hold is not current or hold._undo is None:
            if self._holds and current is None:
                raise RuntimeError(
                    f"{self.kind} {self.path} is held by another thread; "
                    "only the thread that acquired it may release it"
                )
            raise RuntimeError(f"cannot release {self.kind} {self.path}: it is not held here")
        undo, hold._undo = hold._undo, None
        undo.close()

    # -- fork ----------------------------------------------------------------

    def forget_after_fork(self) -> None:
        """In a forked child: hold nothing, and reopen the file on next use."""
        self._fd = None
        self._fd_busy = False
        self._fd_mutex = threading.Lock()
        self._holds.clear()


def forget_all_after_fork() -> None:
    """Reset every live lock object in a forked child (descriptors already closed)."""
    for core in list(_live_cores):
        core.forget_after_fork()
