"""Scheduler permits: at most ``parallel`` pack operations at once (tier ``SEMAPHORE``).

Without ``slots_dir`` the bound is this process's. With ``slots_dir`` it
holds across every process that uses the directory: a permit is a slot lock
file ``slot-<n>.lock`` taken through the one lock primitive (so it has an
owner record, and the kernel frees it when its holder dies), and the
directory records its bound in ``scheduler.json`` so that every process
counts to the same number.

In a process, the threads that want a permit of one bound are served first
in, first out, through one :class:`~grex_locks._core.fair_queue.FairQueue`.
In-process bound: the queue admits up to ``parallel`` threads, and admission
is the permit. Slots directory (one queue for every scheduler object on it),
where the queue's single place is *the turn* to wait for a slot::

    acquire -> nobody waiting? -yes-> try each slot once -free-> permit
                    | no                     | all taken
                    v                        v
          queue for the turn -------> with the turn: block in the kernel on
          (waits on its own wake-up)  every slot file at once, take the first
                                      slot granted, pass the turn on

Only the thread with the turn waits in the kernel, so however many threads
wait, a process runs at most one helper thread per slot file (each turn takes
over the kernel waits the previous one left behind), and a slot freed by any
process — this one included — wakes that thread through the kernel, without
polling. Attempts inside an acquire diagnose nothing: the one error a caller
sees is built at the end, and names the slots' holders when first read.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from loguru import logger

from ._core import slow_waits
from ._core.fair_queue import FairQueue, Ticket
from ._core.fork import generation
from ._core.kernel_wait import KernelWait
from ._core.kernel_wait import kernel_wait as kernel_wait_for
from ._core.lock_file import FileKey, make_directories, not_a_directory
from ._core.primitive import Hold, LockCore
from ._core.tiers import Tier, enter_tier
from ._core.undo import Undo, UndoHandle, held_until_released
from ._core.waiting import CancelEvent, Wake, deadline_after, is_cancelled, remaining, wait_for
from ._holder_errors import holder_of
from .errors import LockBusy, LockCancelled, LockIOError, LockTimeout
from .locks import _checked_cancel, opened_at_first_use

if TYPE_CHECKING:
    from ._diagnostics.diagnosis import Diagnosis

#: The file in a slots directory that records its bound: ``{"parallel": N}``.
BOUND_FILE_NAME = "scheduler.json"
_BOUND_FILE_MAX = 4096


# -- the bound a slots directory records -------------------------------------------------------


def _bound_io_error(path: Path, what: str, exc: OSError) -> LockIOError:
    blocked = not_a_directory(path, exc, "the slots directory")
    if blocked is not None:
        reason = blocked
    elif exc.errno == errno.ELOOP:
        reason = "a symlink sits there, and it is never followed"
    else:
        reason = exc.strerror or str(exc)
    error = LockIOError(path, f"cannot {what} {path}: {reason}")
    error.__cause__ = exc
    return error


def _read_bound(path: Path) -> tuple[int, FileKey] | None:
    """The bound recorded at ``path`` and the file's identity; ``None`` if there is no record."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _bound_io_error(path, "read the scheduler bound recorded in", exc) from exc
    try:
        info = os.fstat(fd)
        data = os.read(fd, _BOUND_FILE_MAX + 1) if stat.S_ISREG(info.st_mode) else b""
    except OSError as exc:
        raise _bound_io_error(path, "read the scheduler bound recorded in", exc) from exc
    finally:
        os.close(fd)
    try:
        recorded = json.loads(data)["parallel"]
    except (ValueError, TypeError, KeyError):
        recorded = None
    if not stat.S_ISREG(info.st_mode) or type(recorded) is not int or recorded < 0:
        raise LockIOError(
            path,
            f"{path} should record the bound of the slots directory {path.parent} as "
            f'{{"parallel": N}}, but it holds {data[:80]!r}; once no process uses the '
            "directory, remove it (the next scheduler records its own bound)",
        )
    return recorded, (info.st_dev, info.st_ino)


def _record_bound(path: Path, parallel: int) -> tuple[int, FileKey]:
    """Record ``parallel`` at ``path`` unless a bound is recorded; return the bound that stands.

    The record is written to a private file and hard-linked into place:
    ``link`` never replaces an existing name (nor follows a symlink planted
    there), so when processes race, exactly one record wins and every
    process reads that one. It is made readable by everyone, whatever the
    umask, and never rewritten.
    """
    for _ in range(3):
        found = _read_bound(path)
        if found is not None:
            return found
        try:
            make_directories(path.parent)
            fd, private = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise _bound_io_error(path, "record the scheduler bound in", exc) from exc
        try:
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, json.dumps({"parallel": parallel}).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(private, path)
        except FileExistsError:
            pass  # another process recorded a bound first: that one stands
        except OSError as exc:
            raise _bound_io_error(path, "record the scheduler bound in", exc) from exc
        finally:
            try:
                os.unlink(private)
            except OSError:
                logger.debug("could not remove the private file {}", private)
    raise LockIOError(path, f"the scheduler bound in {path} keeps disappearing")


def _check_bound(slots_dir: Path, parallel: int) -> FileKey:
    """Refuse ``parallel`` unless it is the bound ``slots_dir`` records (recording it if none)."""
    path = slots_dir / BOUND_FILE_NAME
    recorded, key = _record_bound(path, parallel)
    if recorded != parallel:
        bound = "unbounded (0)" if recorded == 0 else f"bounded to {recorded} permits"
        raise ValueError(
            f"Scheduler({parallel}, slots_dir={str(slots_dir)!r}) refused: {slots_dir} is {bound} "
            f"(recorded in {path.name} there), and counting to {parallel} would break that bound "
            f"for every process using it; pass parallel={recorded}, or use another slots_dir "
            f"(to change the bound of {slots_dir}, remove {path} once no process uses it)"
        )
    return key


# -- errors that name the holders when read ------------------------------------------------------

_Describe = Callable[[], tuple[str, tuple["Diagnosis | None", ...]]]
#: Serialises describing: an error read by two threads at once is diagnosed once.
_describing = threading.Lock()


def _renew_describing_in_child() -> None:
    global _describing  # noqa: PLW0603 - a parent thread may have been describing at the fork
    _describing = threading.Lock()


os.register_at_fork(after_in_child=_renew_describing_in_child)


class _NamesHoldersWhenRead:
    """A scheduler's refusal whose holders are diagnosed when the error is first read.

    Diagnosing sixteen slots costs tens of milliseconds, and most callers of
    ``try_acquire`` catch the error and move on; so ``str()``, ``.holder``,
    ``.holders`` and pickling describe the holders once, as they are then.
    """

    _text: str
    _first: Diagnosis | None
    _describe: _Describe | None = None
    _holders: tuple[Diagnosis | None, ...] = ()

    def _described(self) -> None:
        with _describing:
            describe, self._describe = self._describe, None
            if describe is not None:
                clause, self._holders = describe()
                self._text += clause
                if self._first is None:
                    self._first = next((d for d in self._holders if d is not None), None)

    @property
    def message(self) -> str:
        self._described()
        return self._text

    @message.setter
    def message(self, text: str) -> None:
        self._text = text

    @property
    def holder(self) -> Diagnosis | None:
        """A diagnosis of the first slot's holder (every slot's is in :attr:`holders`)."""
        self._described()
        return self._first

    @holder.setter
    def holder(self, holder: Diagnosis | None) -> None:
        self._first = holder

    @property
    def holders(self) -> tuple[Diagnosis | None, ...]:
        """One diagnosis per slot file, in slot order (empty without a slots directory)."""
        self._described()
        return self._holders

    def __reduce__(self) -> tuple[Any, ...]:
        # LockBusy's or LockTimeout's own, which reads the message (describing it)
        # and keeps the chain of causes; the holders of every slot go along.
        rebuilt = cast("tuple[Any, ...]", super().__reduce__())
        return (*rebuilt[:2], {**rebuilt[2], "_holders": self.holders})


class PermitsBusy(_NamesHoldersWhenRead, LockBusy):
    """``LockBusy`` from :meth:`Scheduler.try_acquire`: every permit is out."""


class PermitTimeout(_NamesHoldersWhenRead, LockTimeout):
    """``LockTimeout`` from :meth:`Scheduler.acquire`: no permit came in time."""


def _slot_holders(slots: Sequence[tuple[Path, FileKey]]) -> _Describe:
    def describe() -> tuple[str, tuple[Diagnosis | None, ...]]:
        diagnoses = tuple(holder_of(path, key) for path, key in slots)
        parts = []
        for (path, _), diagnosis in zip(slots, diagnoses, strict=True):
            summary = diagnosis.holder_summary() if diagnosis is not None else "holder unknown"
            parts.append(f"{path.name} {summary or 'free now'}")
        return ": " + "; ".join(parts), diagnoses

    return describe


# -- this process's side of a bound ------------------------------------------------------------


class _Epoch:
    """Bumped by :func:`reset_all_after_fork`; with the fork generation, dates a bound's state."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


_epoch = _Epoch()


def _now() -> tuple[int, int]:
    return (generation.value, _epoch.value)


class _Permits:
    """This process's side of one bound: the fair queue its threads wait in, and what is out.

    In-process bound: ``queue`` admits up to ``capacity`` tickets at once,
    and an admitted ticket *is* a permit. Slots directory: ``queue`` admits
    one exclusive ticket at a time, the turn to look for a slot — its holder
    is the head of the line, the only thread that waits in the kernel — and
    the slot files themselves bound the permits.
    """

    def __init__(self, capacity: int | None) -> None:
        self.queue = FairQueue(capacity)
        #: One entry per permit out in this process: the holding thread's name.
        self.out: dict[object, str] = {}
        self.kernel_waiters = 0
        self.epoch = _now()


#: What an unpickled scheduler starts with: never the current epoch, so its first
#: ``_permits()`` opens its slots directory (see :func:`_rebuild`).
_NOT_OPENED = _Permits(None)
_NOT_OPENED.epoch = (-1, -1)

_shared_mutex = threading.Lock()
#: One state per slots directory (by its bound file's identity), shared by its schedulers.
_shared: weakref.WeakValueDictionary[FileKey, _Permits] = weakref.WeakValueDictionary()


def _shared_permits(key: FileKey) -> _Permits:
    with _shared_mutex:
        permits = _shared.get(key)
        if permits is None or permits.epoch != _now():
            permits = _shared[key] = _Permits(None)
        return permits


def _forget_shared_in_child() -> None:
    global _shared_mutex  # noqa: PLW0603 - a parent thread may have held it at the fork
    _shared_mutex = threading.Lock()
    _shared.clear()


os.register_at_fork(after_in_child=_forget_shared_in_child)


def reset_all_after_fork() -> None:
    """Forget every scheduler's in-process state, as a forked child does (for recovery tools)."""
    _epoch.value += 1
    with _shared_mutex:
        _shared.clear()


class _SlotAttempt:
    """What one acquire has under way on the slot files, for its undo stack to settle.

    ``tried`` holds each slot from just before its ``take`` until the take is
    known to have failed, so an interruption at any point still finds a hold
    it got; ``claims`` holds the undo of each kernel wait claimed.
    """

    __slots__ = ("claims", "tried")

    def __init__(self) -> None:
        self.tried: list[LockCore] = []
        self.claims: list[Undo] = []

    def take(
        self,
        core: LockCore,
        *,
        wait: bool,
        deadline: float | None = None,
        cancel: CancelEvent | None = None,
        granted_wait: KernelWait | None = None,
    ) -> Hold | None:
        if core.held_by_current_thread():
            # This thread's own permit (two permits in one thread, with the
            # tier check off): not a free slot, and never this attempt's to settle.
            if granted_wait is not None:
                granted_wait.settle()
            return None
        self.tried.append(core)
        hold = core.take(
            wait=wait, deadline=deadline, cancel=cancel, tier_taken=True, granted_wait=granted_wait
        )
        if hold is None:
            self.tried.pop()
        return hold

    def settle(self) -> None:
        """Release the slot taken, then the kernel waits (one adopted by the hold is settled)."""
        while self.tried:
            self.tried[-1].release_if_held()
            self.tried.pop()
        while self.claims:
            self.claims[-1].close()
            self.claims.pop()


# -- the public face -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerStatistics:
    """A snapshot of a scheduler in this process, for introspection (as trio's ``statistics()``).

    For a slots directory the figures cover every scheduler object of this
    process on that directory; other processes' permits are not counted.
    """

    #: The bound on permits out at once, or ``None`` when unbounded.
    max_parallelism: int | None
    #: Permits held by threads of this process now.
    permits_out: int
    #: Threads of this process waiting for a permit now.
    threads_waiting: int
    #: Slot files the head of the line waits on in the kernel now (one helper thread each).
    kernel_waiters: int


class Permit(UndoHandle):
    """Permission to run one pack operation; a context manager that gives it back.

    It lasts until released or until the process ends, even if the program
    drops every reference to it. In a forked child, releasing a permit taken
    by the parent does nothing: the parent still holds it.
    """

    __slots__ = ("slot",)

    def __init__(self, undo: Undo, slot: Path | None) -> None:
        super().__init__(undo, "scheduler permit")
        #: The slot lock file this permit holds (``None`` for an in-process scheduler).
        self.slot = slot


class Scheduler:
    """Bounds how many pack operations run at once: at most ``parallel`` permits out.

    ``parallel=0`` means unbounded (and logs a warning). With ``slots_dir``
    the bound holds across every process using that directory, and the
    scheduler pickles as ``(parallel, slots_dir)``; without it the scheduler
    is this process's alone and refuses to pickle.

    A slots directory has one bound: the first scheduler on it records its
    ``parallel`` in ``<slots_dir>/scheduler.json``, and a scheduler passing
    another count is refused with a ``ValueError`` that names both. (Were each
    process to count to its own number, ``Scheduler(2)`` next to
    ``Scheduler(4)`` would let four permits out.) The record is never
    rewritten: to change a directory's bound, remove the file once no
    process uses the directory, or use another directory.

    Threads of one process are served first in, first out; across processes
    the kernel decides who gets a freed slot.
    """

    def __init__(self, parallel: int, *, slots_dir: str | os.PathLike[str] | None = None) -> None:
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 0:
            raise ValueError(f"parallel must be a whole number >= 0, not {parallel!r}")
        if parallel == 0:
            logger.warning("Scheduler(parallel=0): no bound on parallel pack operations")
        self._parallel = parallel
        self._slots_dir = Path(slots_dir).absolute() if slots_dir is not None else None
        self._repr = _describe(parallel, self._slots_dir)
        # Opened here, so that the constructor raises when the directory is
        # refused or bound to another count; an unpickled one, at first use.
        self._opened = _open_slots(parallel, self._slots_dir)
        self._permits_now = self._new_permits()

    @functools.cached_property
    def _opened(self) -> _Slots:
        # Reached only by a scheduler rebuilt by unpickling (see _rebuild): the
        # constructor sets it.
        return opened_at_first_use(
            self, "_opened", lambda: _open_slots(self._parallel, self._slots_dir)
        )

    def _new_permits(self) -> _Permits:
        key = self._opened.bound_key
        if key is not None:
            return _shared_permits(key)
        return _Permits(self._parallel or None)

    def _permits(self) -> _Permits:
        """This process's state of the bound; a fresh one in a forked child."""
        if self._permits_now.epoch != _now():
            self._permits_now = self._new_permits()
        return self._permits_now

    @property
    def max_parallelism(self) -> int | None:
        """The bound on permits out at once, or ``None`` when unbounded."""
        return self._parallel or None

    @property
    def slots_dir(self) -> Path | None:
        """The directory whose slot files carry the bound across processes, if any."""
        return self._slots_dir

    def statistics(self) -> SchedulerStatistics:
        """Permits out, threads waiting and kernel waits in this process, now."""
        permits = self._permits()
        queued = permits.queue.statistics()
        # For a slots directory, the queue's holder is the head of the line, still waiting.
        waiting = queued.waiting + (queued.holders if self._opened.cores else 0)
        return SchedulerStatistics(
            max_parallelism=self.max_parallelism,
            permits_out=len(permits.out),
            threads_waiting=waiting,
            kernel_waiters=permits.kernel_waiters,
        )

    def acquire(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Permit:
        """Wait for a permit; raise :class:`LockTimeout` or :class:`LockCancelled` if none comes."""
        return self._acquire(
            wait=True, deadline=deadline_after(timeout), cancel=_checked_cancel(cancel)
        )

    def try_acquire(self) -> Permit:
        """Take a permit if one is free now; raise :class:`LockBusy` otherwise."""
        return self._acquire(wait=False, deadline=None, cancel=None)

    def _acquire(self, *, wait: bool, deadline: float | None, cancel: CancelEvent | None) -> Permit:
        if is_cancelled(cancel):
            raise LockCancelled(self._slots_dir, f"waiting for a permit of {self} was cancelled")
        started = time.monotonic()
        permits = self._permits()
        token = object()

        def take_permit(undo: Undo) -> Permit:
            enter_tier(undo, Tier.SEMAPHORE, self._slots_dir)
            undo.push(permits.out.pop, token, None)
            slot: Path | None = None
            if not self._opened.cores:
                ticket = Ticket(threading.get_ident(), False)
                undo.push(permits.queue.leave, ticket)
                if not permits.queue.enter(ticket, wait, deadline, cancel, self._slow_wait()):
                    raise self._refusal(permits, wait, started, cancel)
            else:
                attempt = _SlotAttempt()
                undo.push(attempt.settle)
                hold = self._take_slot(
                    permits, undo, attempt, wait=wait, deadline=deadline, cancel=cancel
                )
                if hold is None:
                    raise self._refusal(permits, wait, started, cancel)
                slot = hold.core_path
            permits.out[token] = threading.current_thread().name
            return Permit(undo, slot)

        return held_until_released(take_permit)

    # -- a slots directory ---------------------------------------------------------------------

    def _take_slot(
        self,
        permits: _Permits,
        undo: Undo,
        attempt: _SlotAttempt,
        *,
        wait: bool,
        deadline: float | None,
        cancel: CancelEvent | None,
    ) -> Hold | None:
        """A slot: at once if no thread of ours waits, else in turn; ``None`` if not granted.

        Threads look at the slot files without queueing while nobody waits;
        once one finds them all taken, it takes the turn (the queue's one
        place) and waits in the kernel, and later threads queue behind it.
        """
        turn = permits.queue
        looked = False
        if not turn.in_use:
            hold = self._first_free_slot(attempt)
            if hold is not None or not wait:
                return hold
            looked = True
        elif not wait:
            return None
        ticket = Ticket(threading.get_ident(), True)
        undo.push(turn.leave, ticket)
        try:
            # One slow wait from here, whether spent behind another thread of
            # ours or in the kernel.
            with slow_waits.watching(self._slow_wait()):
                if not turn.enter(ticket, False, None, None, None):
                    looked = False
                    if not turn.enter(ticket, True, deadline, cancel, None):
                        return None
                if remaining(deadline) == 0.0 or is_cancelled(cancel):
                    return None
                hold = None if looked else self._first_free_slot(attempt)
                if hold is None:
                    hold = self._wait_in_kernel(permits, attempt, deadline, cancel)
                return hold
        finally:
            turn.leave(ticket)  # the next thread's turn, now

    def _first_free_slot(self, attempt: _SlotAttempt) -> Hold | None:
        """Try each slot once, without waiting and without diagnosing anyone."""
        for core in self._opened.cores:
            if core.busy_elsewhere():
                continue
            hold = attempt.take(core, wait=False)
            if hold is not None:
                return hold
        return None

    def _wait_in_kernel(
        self,
        permits: _Permits,
        attempt: _SlotAttempt,
        deadline: float | None,
        cancel: CancelEvent | None,
    ) -> Hold | None:
        """Having the turn, block in the kernel on every slot; take the first one granted.

        Each slot's kernel wait is a helper thread that the previous turn left
        behind, taken over, or a new one; every wait but the one taken is
        left behind again for the next turn (or released, if the kernel
        granted it too). Returns ``None`` only when the deadline passed or
        ``cancel`` was set.
        """
        wake = Wake()
        waits: list[tuple[LockCore, KernelWait, Undo]] = []
        chosen: tuple[LockCore, KernelWait, Undo] | None = None
        try:
            for core in self._opened.cores:
                own = Undo()
                attempt.claims.append(own)
                kernel_wait = kernel_wait_for(
                    core.descriptor(), core.path, core.key, own, shared=False, wake=wake
                )
                waits.append((core, kernel_wait, own))
                kernel_wait.start()
            permits.kernel_waiters = len(waits)
            while chosen is None:
                chosen = next((w for w in waits if w[1].granted()), None)
                if chosen is None:
                    if remaining(deadline) == 0.0 or is_cancelled(cancel):
                        return None
                    wait_for(wake, deadline, cancel)
                    wake.clear()
        finally:
            permits.kernel_waiters = 0
            for waiting in waits:
                if waiting is not chosen:
                    waiting[2].close()
                    attempt.claims.remove(waiting[2])
        core, kernel_wait, _ = chosen
        return attempt.take(
            core, wait=True, deadline=deadline, cancel=cancel, granted_wait=kernel_wait
        )

    def _slow_wait(self) -> tuple[object, str]:
        """What the slow-wait log names for a wait for a permit of this scheduler."""
        return (_WaitedPermits(self), "a permit of")

    def _holders_now(self) -> str:
        """Who holds this scheduler's permits now, for a slow wait's log line."""
        if self._opened.cores:
            return _slot_holders(self._opened.files)()[0].removeprefix(": ")
        names = list(self._permits().out.values())
        return f"held by threads {', '.join(names)} of this process" if names else "free now"

    # -- refusals --------------------------------------------------------------------------------

    def _refusal(
        self, permits: _Permits, wait: bool, started: float, cancel: CancelEvent | None
    ) -> LockBusy | LockTimeout | LockCancelled:
        """The one error a caller sees; the slots' holders are diagnosed only when it is read."""
        waited = time.monotonic() - started
        if wait and is_cancelled(cancel):
            return LockCancelled(
                self._slots_dir,
                f"waiting for a permit of {self} was cancelled after {waited:.3f} s",
            )
        clause = ""
        if not self._opened.cores:
            names = list(permits.out.values())
            clause = f": held by threads {', '.join(names)} of this process" if names else ""
        error: PermitsBusy | PermitTimeout
        if not wait:
            error = PermitsBusy(
                self._slots_dir, f"all {self._parallel} permits of {self} are in use{clause}"
            )
        else:
            error = PermitTimeout(
                self._slots_dir,
                f"timed out after {waited:.3f} s waiting for a permit of {self} "
                f"(all {self._parallel} in use){clause}",
                None,
                waited,
            )
        if self._opened.cores:
            error._describe = _slot_holders(self._opened.files)
        return error

    def __reduce__(self) -> tuple[Any, ...]:
        if self._slots_dir is None:
            raise TypeError(
                "a Scheduler without slots_dir bounds one process only and cannot be pickled; "
                "give it a slots_dir to share the bound across processes"
            )
        return (_rebuild, (self._parallel, self._slots_dir))

    def __repr__(self) -> str:
        return self._repr


class _WaitedPermits:
    """A scheduler as the slow-wait log shows it: its repr, and who holds its permits."""

    __slots__ = ("_scheduler",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def __str__(self) -> str:
        return repr(self._scheduler)

    def describe_holders(self) -> str:
        return self._scheduler._holders_now()


def _rebuild(parallel: int, slots_dir: Path) -> Scheduler:
    """A scheduler sent to another process, its slots directory opened at first use there.

    Not by the unpickling: a directory the OS refuses (or bound to another
    count) would then fail the unpickling itself, which in a
    ``ProcessPoolExecutor`` worker kills the worker and breaks the whole
    pool. At first use the refusal is the error of the call that made it.
    """
    scheduler = Scheduler.__new__(Scheduler)
    scheduler._parallel = parallel
    scheduler._slots_dir = slots_dir
    scheduler._repr = _describe(parallel, slots_dir)
    scheduler._permits_now = _NOT_OPENED
    return scheduler


def _describe(parallel: int, slots_dir: Path | None) -> str:
    where = f", slots_dir={str(slots_dir)!r}" if slots_dir else ""
    return f"Scheduler({parallel}{where})"


@dataclass(frozen=True)
class _Slots:
    """A scheduler's slots directory, opened: its slot locks and what identifies its bound."""

    #: One lock per slot file, ``slot-0.lock`` first (none without a slots directory).
    cores: list[LockCore]
    #: Each slot's lock file and its identity, in slot order.
    files: list[tuple[Path, FileKey]]
    #: The identity of the bound's record (``scheduler.json``), shared by every
    #: scheduler of this process on the directory; ``None`` without slots.
    bound_key: FileKey | None


def _open_slots(parallel: int, slots_dir: Path | None) -> _Slots:
    """Check ``slots_dir``'s bound and open its slot files (nothing without a directory)."""
    if slots_dir is None:
        return _Slots([], [], None)
    key = _check_bound(slots_dir, parallel)
    if not parallel:
        return _Slots([], [], None)
    cores = [
        LockCore(slots_dir / f"slot-{n}.lock", tier=Tier.SEMAPHORE, kind="scheduler slot")
        for n in range(parallel)
    ]
    return _Slots(cores, [(core.path, core.key) for core in cores], key)
