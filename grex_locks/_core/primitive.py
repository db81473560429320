"""The one lock primitive behind all five grex locks.

Every acquire, whatever the lock, runs the same pipeline, and every release
runs it backwards::

    re-entry check -> tier check -> in-process gate -> flock -> owner record
         (LockBusy)  (TierViolation)   (threads wait)  (processes wait)

Each step notes on the :class:`Hold` what it is about to do *before* it acts
(the ticket it queues with, the tier token, the descriptor it claims and
locks, the record it writes), so an exception at any point — a timeout,
``KeyboardInterrupt`` — unwinds exactly what was done, and a release is
nothing but that unwinding. The steps are fixed, so the hold keeps them in
named slots rather than on a general undo stack: an uncontended cycle runs
in a third fewer instructions. The rare extras (a kernel wait, a slot the
kernel granted a scheduler) go on a small :class:`~grex_locks._core.undo.Undo`
the hold unwinds at their place. The five lock classes only choose the
arguments: where the file is, shared or exclusive, wait or fail fast, and the
tier.

Lifetime: a hold is kept alive by :mod:`~grex_locks._core.undo` until it is
released, so a lock stays held until release or process exit even if the
program drops every reference to it. Fork: a lock object used in a forked
child notices the new generation and starts afresh (its descriptor was
closed without unlocking); a hold inherited from the parent is disarmed.

The core refuses quietly: :meth:`LockCore.take` returns ``None`` when the lock
was not granted, and the public layer above builds the error (with a
diagnosis of the holder) for its caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from threading import get_ident
from typing import Any, NoReturn

from grex_locks.errors import LockBusy

from . import lock_file as lockfile
from . import os_lock as oslock
from . import slow_waits
from .fair_queue import Ticket, queue_for
from .fork import generation
from .kernel_wait import KernelWait
from .kernel_wait import kernel_wait as kernel_wait_for
from .owner_record import RecordFile
from .tiers import Tier, pop_tier, push_tier
from .undo import ReleasedOnExit, Undo, holding
from .waiting import CancelEvent, NearDeadline, is_cancelled, remaining, wait_for


class _HoldSteps(ReleasedOnExit):
    """What one acquisition did, and how to undo it: all of :class:`Hold` but its finalizer.

    Its slots say what the acquire did, each set just *before* the step it
    undoes, and cleared only once that undo has run; unwinding runs the undo
    of every slot still set, newest step first. So a release (or a failed
    acquire) cut short by an interruption is finished by running it again,
    and every undo is idempotent. A hold fully unwound becomes one of these:
    collecting it then runs no finalizer (see :class:`Hold`).
    """

    __slots__ = (
        "__weakref__",
        "_claim",
        "_core",
        "_extra",
        "_generation",
        "_locked",
        "_private",
        "_recorded",
        "_ticket",
        "_tier_token",
        "fd",
        "shared",
        "thread",
    )

    def __init__(self, core: LockCore, thread: int, shared: bool) -> None:
        self._core = core
        #: The identity of the thread that took this hold (the only one that may release it).
        self.thread = thread
        self.shared = shared
        self._generation = generation.value
        #: The descriptor whose open file description holds the lock (-1 until it does).
        self.fd = -1
        self._ticket: Ticket | None = None
        self._tier_token: object | None = None
        self._claim: object | None = None
        #: A private descriptor opened for this hold (closed on release), in a one-item list.
        self._private: list[int] | None = None
        #: The descriptor to unlock on release (set before the flock is asked for).
        self._locked: int | None = None
        #: True once the record is (about to be) written; None: nothing to blank.
        self._recorded: bool | None = None
        #: Rare extra undo steps (kernel waits), unwound between the record and the unlock.
        self._extra: Undo | None = None

    @property
    def inherited(self) -> bool:
        """Whether this hold was taken by the parent of this (forked) process."""
        return self._generation != generation.value

    @property
    def core_path(self) -> Path:
        """The lock file this hold is on."""
        return self._core.path

    @property
    def released(self) -> bool:
        """Whether nothing of this hold is left to undo."""
        # One test per slot of _UNDO_NEWEST_FIRST, spelled out: this runs twice
        # per lock cycle, and a loop of getattr calls would add 5 % to it.
        return (
            self._recorded is None
            and self._extra is None
            and self._locked is None
            and self._private is None
            and self._claim is None
            and self._ticket is None
            and self._tier_token is None
        )

    def extra(self) -> Undo:
        """The undo stack for this hold's rare steps, made on first use."""
        extra = self._extra
        if extra is None:
            extra = self._extra = Undo()
        return extra

    def release(self) -> None:
        """Release this hold; only the thread that acquired it may.

        In a forked child, releasing (or dropping, or leaving the ``with`` of)
        a hold inherited from the parent does nothing, however often: the lock
        is the parent's, and the hold's undo steps are dropped unrun.
        """
        if self._generation != generation.value:
            self._disarm()
            return
        self._core.release_hold(self)

    def _disarm(self) -> None:
        for slot, _ in _UNDO_NEWEST_FIRST:
            setattr(self, slot, None)

    def _unwind(self) -> None:
        """Undo every step still noted, newest first; raise the first failure at the end.

        A step that fails is run once more before moving on (an asynchronous
        exception can strike as it starts, before it has done its work), then
        dropped. An interruption between two steps is noted and the unwinding
        goes on. Only an interruption in the few bytecodes around this loop
        leaves steps noted: the next call (or the collector) finishes them.
        """
        if self._generation != generation.value:
            self._disarm()
            return
        errors: list[BaseException] = []
        try:
            while True:
                try:
                    self._undo_steps(errors)
                    break
                except BaseException as exc:  # noqa: BLE001 - an interruption between steps
                    errors.append(exc)
        finally:
            if self.released:
                holding.pop(self, None)
                holds = self._core._holds
                if holds.get(self.thread) is self:
                    del holds[self.thread]
                # Nothing left to finish if collected: no finalizer to run.
                self.__class__ = _HoldSteps
        if errors:
            raise errors[0]

    def _undo_steps(self, errors: list[BaseException]) -> None:
        for slot, undo in _UNDO_NEWEST_FIRST:
            noted = getattr(self, slot)
            if noted is None:
                continue
            try:
                undo(self, noted)
            except BaseException as exc:  # noqa: BLE001 - see _again
                _again(errors, exc, undo, self, noted)
            setattr(self, slot, None)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Hold of {self._core.kind} {self._core.path} ({state})>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"a hold of {self._core.kind} {self._core.path} belongs to the thread that took "
            "it and cannot be sent to another process; send the lock object itself "
            "(it arrives as a fresh, unheld lock)"
        )


class Hold(_HoldSteps):
    """One acquisition of a lock; a context manager that releases it on exit.

    A hold lasts until it is released or the process ends, even if the
    program drops every reference to it. Only the thread that took it may
    release it; in a forked child, releasing one inherited from the parent
    does nothing. A hold cannot be pickled: send the lock object instead.
    """

    __slots__ = ()

    def __del__(self) -> None:
        # The last line of defence: collected with steps left — an
        # interruption cut its unwinding short where no handler could finish
        # it — it finishes them rather than leave a lock held for good. (A
        # held hold is pinned, so never collected; a fully unwound one is a
        # _HoldSteps, so the common cycle runs no finalizer, which is also a
        # place where Ctrl-C is swallowed as "Exception ignored".)
        with contextlib.suppress(BaseException):
            # (AttributeError: an interruption cut __init__ short; nothing was noted.)
            if not self.released:
                self._unwind()


def _blank_record(hold: _HoldSteps, _: object) -> None:
    hold._core._record.blank()


def _close_extra(hold: _HoldSteps, extra: Undo) -> None:
    extra.close_fully()


def _unlock(hold: _HoldSteps, fd: int) -> None:
    oslock.unlock(fd, hold._core.path)


def _close_private(hold: _HoldSteps, handle: list[int]) -> None:
    lockfile.close_once(handle)


def _free_claim(hold: _HoldSteps, claim: object) -> None:
    hold._core._free_descriptor(claim)


def _leave_queue(hold: _HoldSteps, ticket: Ticket) -> None:
    hold._core.queue.leave(ticket)


def _leave_tier(hold: _HoldSteps, token: object) -> None:
    pop_tier(token)


#: Each slot of a hold and the undo of the step it notes, in unwinding order
#: (the reverse of the acquire's): the record is blanked before the unlock,
#: the unlock comes before the descriptor is freed (or another thread could
#: claim a still-locked description), and that before the queue lets the
#: next thread in.
_UNDO_NEWEST_FIRST: tuple[tuple[str, Callable[[Any, Any], None]], ...] = (
    ("_recorded", _blank_record),
    ("_extra", _close_extra),
    ("_locked", _unlock),
    ("_private", _close_private),
    ("_claim", _free_claim),
    ("_ticket", _leave_queue),
    ("_tier_token", _leave_tier),
)


def _again(
    errors: list[BaseException], exc: BaseException, step: Callable[..., object], *args: object
) -> None:
    """A step failed with ``exc``: note it (raised once unwinding is over), run the step once more.

    An asynchronous exception can strike as a step starts, before it has
    done its work; every step is idempotent, so a second run is safe.
    """
    errors.append(exc)
    with contextlib.suppress(BaseException):
        step(*args)


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
        #: Who uses this object's descriptor now: ``{0: token}`` while claimed. A dict,
        #: so that a claim is one atomic ``setdefault`` rather than a mutex round trip.
        self._fd_claim: dict[int, object] = {}
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
            self._fd_claim = {}
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
        near_deadline: NearDeadline | None = None,
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
        if the acquire fails. ``near_deadline`` is called once if a wait is
        still going shortly before ``deadline`` (see :func:`.waiting.wait_for`).
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
        hold = Hold(self, me, shared)
        # Each step is noted on the hold *before* it acts, so that an
        # exception at any point (KeyboardInterrupt included) unwinds exactly
        # what was done; see Hold.
        try:
            if granted_wait is not None:
                hold.extra().push(granted_wait.settle)
            if not tier_taken:
                hold._tier_token = token = object()
                push_tier(token, self.tier, self.path)
            hold._ticket = ticket = Ticket(me, not shared)
            if not queue.enter(
                ticket, wait, deadline, cancel, self._watch, near_deadline=near_deadline
            ):
                hold._unwind()
                return None
            got = self._lock_os(
                hold,
                wait,
                deadline,
                cancel,
                granted_wait=granted_wait,
                near_deadline=near_deadline,
            )
            if not got:
                hold._unwind()
                return None
            ticket.granted = True
            if not shared:
                hold._recorded = True
                self._record.write(self.tier, hold)
            self._holds[me] = hold
            if got is not True:
                got.taken()
        except BaseException:
            with contextlib.suppress(BaseException):
                hold._unwind()
            raise
        # After the try, where no signal handler runs: a hold is pinned (kept
        # alive until released) only once its caller is sure to receive it.
        holding[hold] = None
        return hold

    def _lock_os(
        self,
        hold: Hold,
        wait: bool,
        deadline: float | None,
        cancel: CancelEvent | None,
        *,
        granted_wait: KernelWait | None,
        near_deadline: NearDeadline | None,
    ) -> bool | KernelWait:
        """Take the flock for ``hold`` (setting ``hold.fd``); False if not granted.

        A grant that came through a helper thread's kernel wait (``granted_wait``,
        or one started here) returns that wait: the caller tells it
        (:meth:`KernelWait.taken`) once its first steps with the lock are done.
        """
        if granted_wait is not None:
            hold.fd = granted_wait.fd
            return granted_wait
        # This object's descriptor, or a private one while another thread uses
        # it: two holds must never share an open file description (unlocking
        # one would unlock the other).
        fd = self._fd if self._fd is not None else self.descriptor()
        hold._claim = token = object()
        if self._fd_claim.setdefault(0, token) is not token:
            hold._claim = None
            hold._private = handle = []
            handle.append(lockfile.reopen(fd, self.path))
            fd = handle[0]
        # Noted before locking, so no interruption can leave the lock taken
        # with no undo; unlocking our own unlocked description is harmless.
        hold._locked = hold.fd = fd
        shared = hold.shared
        if oslock.try_lock(fd, self.path, shared):
            return True
        if not wait or remaining(deadline) == 0.0:
            hold._locked = None  # this description holds nothing to let go
            return False
        if not shared:
            self._record.prepare(self.tier, hold)
        if deadline is None and cancel is None:
            # Nothing can end this wait but the kernel's grant, so block in the
            # kernel directly: the fastest hand-off there is.
            with slow_waits.watching(self._watch):
                oslock.lock_blocking(fd, self.path, shared=shared)
            return True
        kernel_wait = kernel_wait_for(fd, self.path, self.key, hold.extra(), shared=shared)
        kernel_wait.start()
        wait_for(kernel_wait.wake, deadline, cancel, self._watch, near_deadline)
        if not kernel_wait.granted():
            return False
        hold.fd = kernel_wait.fd
        return kernel_wait

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
        if fd is None or self._fd_claim or self.queue._holders:
            return False
        # The steps are noted on a hold, so that an interruption anywhere
        # (between the grant and the unlock, say) is unwound all the same.
        probe = Hold(self, get_ident(), False)
        probe._claim = token = object()
        if self._fd_claim.setdefault(0, token) is not token:
            probe._claim = None
            return False
        # Unlocked whether or not the attempt gets it: nothing else uses this
        # description while it is claimed, so this unlocks nobody else.
        probe._locked = fd
        try:
            return not oslock.try_lock(fd, self.path, shared=False)
        finally:
            # Resumed until done: a slot left locked here would block this
            # very process's next wait for it.
            pending: BaseException | None = None
            while not probe.released:
                try:
                    probe._unwind()
                except BaseException as exc:  # noqa: BLE001 - raised once the slot is free
                    pending = pending or exc
            if pending is not None:
                raise pending

    def descriptor(self) -> int:
        """This object's descriptor on the lock file, reopened if a fork closed it."""
        self._renew_if_forked()
        if self._fd is None:
            self._fd = lockfile.open_lock_file(self.path)
        return self._fd

    def _free_descriptor(self, token: object) -> None:
        # Only the claim's owner removes it, so the check and the pop cannot race.
        claims = self._fd_claim
        if claims.get(0) is token:
            claims.pop(0, None)

    # -- the one release path ------------------------------------------------

    def release_hold(self, hold: _HoldSteps | None = None) -> None:
        """Release the calling thread's hold (or ``hold``), undoing its acquire in reverse."""
        if self._generation != generation.value:
            self._renew_if_forked()
        me = get_ident()
        current = self._holds.get(me)
        if hold is None:
            hold = current
        if hold is None or (hold.released and current is not hold):
            if self._holds and current is None:
                raise self._not_this_thread()
            raise RuntimeError(f"cannot release {self.kind} {self.path}: it is not held here")
        if hold.thread != me:
            raise self._not_this_thread()
        # A hold whose release was cut short still has steps noted: this call
        # finishes it (or, if only the last bookkeeping was cut, just ends it).
        hold._unwind()

    def _not_this_thread(self) -> RuntimeError:
        return RuntimeError(
            f"{self.kind} {self.path} is held by another thread; "
            "only the thread that acquired it may release it"
        )

    def release_if_held(self) -> None:
        """Release the calling thread's hold if it has one (an idempotent undo step)."""
        if self.hold_of_current_thread() is not None:
            self.release_hold()
