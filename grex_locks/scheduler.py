"""Scheduler permits: at most ``parallel`` pack operations at once (tier ``SEMAPHORE``).

Without ``slots_dir`` the bound is this process's: an in-process counting
gate. With ``slots_dir`` it holds across every process that uses the
directory: a permit is a slot lock file ``slot-<n>.lock`` taken through the
one lock primitive (so it has an owner record, and the kernel frees it when
its holder dies). A waiter for a slot blocks in the kernel on every slot at
once, one helper thread per slot, and takes the first one granted: a freed
slot goes to a waiter without any polling delay.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from ._core.kernel_wait import KernelWait
from ._core.kernel_wait import kernel_wait as kernel_wait_for
from ._core.primitive import Hold, LockCore
from ._core.tiers import Tier, enter_tier
from ._core.undo import Undo, UndoHandle
from ._core.waiting import CancelEvent, deadline_after, is_cancelled, remaining, wait_for
from .errors import LockBusy, LockCancelled, LockTimeout


class Permit(UndoHandle):
    """Permission to run one pack operation; a context manager that gives it back."""

    __slots__ = ("slot",)

    def __init__(self, undo: Undo, slot: Path | None) -> None:
        super().__init__(undo, "scheduler permit")
        #: The slot lock file this permit holds (``None`` for an in-process scheduler).
        self.slot = slot


@dataclass(eq=False)
class _Ticket:
    """One request for a unit of the local gate: waiting, then granted."""

    wake: threading.Event = field(default_factory=threading.Event)
    granted: bool = False


class _LocalSlots:
    """A first-in, first-out counting gate for the threads of this process."""

    def __init__(self, capacity: int | None) -> None:
        self._capacity = capacity
        self._holders: set[_Ticket] = set()
        self._mutex = threading.Lock()
        self._queue: deque[_Ticket] = deque()
        #: Woken on every release: slot waiters re-examine the slot files.
        self.release_listeners: set[threading.Event] = set()

    def _has_room(self) -> bool:
        return self._capacity is None or len(self._holders) < self._capacity

    def enter(
        self, undo: Undo, *, wait: bool, deadline: float | None, cancel: CancelEvent | None
    ) -> bool:
        """Take one unit, waiting in line if ``wait``; False if none was granted.

        As at the lock gate, the undo is registered before anything changes
        and undoes whatever stage was reached.
        """
        ticket = _Ticket()
        undo.callback(self._leave, ticket)
        with self._mutex:
            if not self._queue and self._has_room():
                self._grant(ticket)
                return True
            if not wait:
                return False
            self._queue.append(ticket)
        wait_for(ticket.wake, deadline, cancel)
        return ticket.granted

    def _grant(self, ticket: _Ticket) -> None:
        self._holders.add(ticket)
        ticket.granted = True
        ticket.wake.set()

    def _leave(self, ticket: _Ticket) -> None:
        with self._mutex:
            if ticket in self._queue:
                self._queue.remove(ticket)
                return
            if ticket not in self._holders:
                return
            self._holders.discard(ticket)
            # Hand the unit straight to the next in line.
            while self._queue and self._has_room():
                self._grant(self._queue.popleft())
            listeners = list(self.release_listeners)
        for listener in listeners:
            listener.set()

    def reset_after_fork(self) -> None:
        self._mutex = threading.Lock()
        self._holders.clear()
        self._queue.clear()
        self.release_listeners.clear()


_live_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class Scheduler:
    """Bounds how many pack operations run at once: at most ``parallel`` permits out.

    ``parallel=0`` means unbounded (and logs a warning). With ``slots_dir``
    the bound holds across every process using that directory, and the
    scheduler pickles as ``(parallel, slots_dir)``; without it the scheduler
    is this process's alone and refuses to pickle.
    """

    def __init__(self, parallel: int, *, slots_dir: str | os.PathLike[str] | None = None) -> None:
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 0:
            raise ValueError(f"parallel must be a whole number >= 0, not {parallel!r}")
        if parallel == 0:
            logger.warning("Scheduler(parallel=0): no bound on parallel pack operations")
        self._parallel = parallel
        self._slots_dir = Path(slots_dir).absolute() if slots_dir is not None else None
        self._local = _LocalSlots(parallel or None)
        self._slots: list[LockCore] = []
        if self._slots_dir is not None and parallel:
            self._slots = [
                LockCore(
                    self._slots_dir / f"slot-{n}.lock", tier=Tier.SEMAPHORE, kind="scheduler slot"
                )
                for n in range(parallel)
            ]
        _live_schedulers.add(self)

    @property
    def max_parallelism(self) -> int | None:
        """The bound on permits out at once, or ``None`` when unbounded."""
        return self._parallel or None

    @property
    def slots_dir(self) -> Path | None:
        """The directory whose slot files carry the bound across processes, if any."""
        return self._slots_dir

    def acquire(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Permit:
        """Wait for a permit; raise :class:`LockTimeout` or :class:`LockCancelled` if none comes."""
        return self._acquire(wait=True, deadline=deadline_after(timeout), cancel=cancel)

    def try_acquire(self) -> Permit:
        """Take a permit if one is free now; raise :class:`LockBusy` otherwise."""
        return self._acquire(wait=False, deadline=None, cancel=None)

    def _acquire(self, *, wait: bool, deadline: float | None, cancel: CancelEvent | None) -> Permit:
        if is_cancelled(cancel):
            raise LockCancelled(self._slots_dir, f"waiting for a permit of {self} was cancelled")
        started = time.monotonic()
        with Undo() as undo:
            enter_tier(undo, Tier.SEMAPHORE, self._slots_dir)
            if not self._local.enter(undo, wait=wait, deadline=deadline, cancel=cancel):
                raise self._refusal(wait, started, cancel)
            slot: Path | None = None
            if self._slots:
                for core in self._slots:
                    undo.callback(core.release_if_held)
                hold = self._take_slot(
                    undo, wait=wait, deadline=deadline, cancel=cancel, started=started
                )
                slot = hold.core_path
            return Permit(undo.pop_all(), slot)

    def _take_slot(
        self,
        undo: Undo,
        *,
        wait: bool,
        deadline: float | None,
        cancel: CancelEvent | None,
        started: float,
    ) -> Hold:
        while True:
            for core in self._slots:
                hold = core.take(wait=False, tier_taken=True)
                if hold is not None:
                    return hold
            if not wait or remaining(deadline) == 0.0 or is_cancelled(cancel):
                raise self._refusal(wait, started, cancel)
            granted = self._wait_for_any_slot(undo, deadline, cancel)
            if granted is not None:
                core, kernel_wait = granted
                hold = core.take(wait=False, tier_taken=True, granted_wait=kernel_wait)
                if hold is not None:
                    return hold
                # Another thread of ours passed the slot's gate first: look again.

    def _wait_for_any_slot(
        self, undo: Undo, deadline: float | None, cancel: CancelEvent | None
    ) -> tuple[LockCore, KernelWait] | None:
        """Block in the kernel on every slot at once; return the first one granted, if any.

        Also returns (None) when a permit of this process is given back, so the
        caller looks at the slot files again. Every wait but the returned one
        is settled here (released or abandoned); each is registered on
        ``undo`` too, so an interruption settles them all.
        """
        wake = threading.Event()
        self._local.release_listeners.add(wake)
        waits: list[tuple[LockCore, KernelWait]] = []
        try:
            for core in self._slots:
                kernel_wait = kernel_wait_for(
                    core.descriptor(), core.path, core.key, undo, shared=False, wake=wake
                )
                waits.append((core, kernel_wait))
                kernel_wait.start()
            wait_for(wake, deadline, cancel)
        finally:
            self._local.release_listeners.discard(wake)
        chosen: tuple[LockCore, KernelWait] | None = None
        for core, kernel_wait in waits:
            if chosen is None and kernel_wait.granted():
                chosen = (core, kernel_wait)
            else:
                kernel_wait.settle()
        return chosen

    def _refusal(
        self, wait: bool, started: float, cancel: CancelEvent | None
    ) -> LockBusy | LockTimeout | LockCancelled:
        waited = time.monotonic() - started
        if not wait:
            return LockBusy(self._slots_dir, f"all {self._parallel} permits of {self} are in use")
        if is_cancelled(cancel):
            return LockCancelled(
                self._slots_dir,
                f"waiting for a permit of {self} was cancelled after {waited:.3f} s",
            )
        return LockTimeout(
            self._slots_dir,
            f"timed out after {waited:.3f} s waiting for a permit of {self} "
            f"(all {self._parallel} in use)",
            None,
            waited,
        )

    def reset_after_fork(self) -> None:
        """In a forked child: no permits out (slot files are reset with every lock)."""
        self._local.reset_after_fork()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._slots_dir is None:
            raise TypeError(
                "a Scheduler without slots_dir bounds one process only and cannot be pickled; "
                "give it a slots_dir to share the bound across processes"
            )
        return (_rebuild, (self._parallel, self._slots_dir))

    def __repr__(self) -> str:
        where = f", slots_dir={str(self._slots_dir)!r}" if self._slots_dir else ""
        return f"Scheduler({self._parallel}{where})"


def _rebuild(parallel: int, slots_dir: Path) -> Scheduler:
    return Scheduler(parallel, slots_dir=slots_dir)


def reset_all_after_fork() -> None:
    """Reset every live scheduler in a forked child."""
    for scheduler in list(_live_schedulers):
        scheduler.reset_after_fork()


os.register_at_fork(after_in_child=reset_all_after_fork)
