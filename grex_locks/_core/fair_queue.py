"""One first-come, first-served queue for the threads of this process.

Every in-process wait in grex_locks is a place in a :class:`FairQueue`: the
gate in front of each lock file (readers share, a writer excludes) and a
scheduler's local permits (at most ``capacity`` at once) are the same code,
as trio's ``ParkingLot`` is under all of its primitives.

The invariant, kept under the queue's mutex: **a ticket is admitted only when
the admission rule allows it and no ticket is waiting ahead of it.** So a
waiting writer holds back the readers that came after it (readers cannot
starve a writer), and a released unit goes to the oldest waiter, handed over
directly: the waiter wakes already admitted, and competes with nobody.

Lock-file queues are shared by every lock object on the same file identity
``(st_dev, st_ino)`` and live exactly as long as one of those objects does,
so a run over 100,000 packs keeps no queue it no longer uses.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass

from .fork import generation
from .lock_file import FileKey
from .waiting import CancelEvent, NearDeadline, Wake, wait_for


class Ticket:
    """One thread's request for a place: waiting, then admitted, then gone."""

    __slots__ = ("admitted", "exclusive", "granted", "thread", "wake")

    def __init__(self, thread: int, exclusive: bool) -> None:
        self.thread = thread
        self.exclusive = exclusive
        self.admitted = False
        #: Set by the caller once what the place is for is really held (a lock
        #: file's flock): an admitted ticket may still wait in the kernel.
        self.granted = False
        # Made only for a ticket that has to wait: most never do.
        self.wake: Wake | None = None


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of one queue: who is in, who waits."""

    #: Threads admitted (through the queue, though maybe still waiting in the kernel).
    holder_threads: tuple[int, ...]
    exclusive: bool
    waiting: int
    #: Of ``holder_threads``, those whose tickets are marked granted.
    granted_threads: tuple[int, ...] = ()

    @property
    def holders(self) -> int:
        """How many places are held."""
        return len(self.holder_threads)


class FairQueue:
    """Admission in arrival order under one rule: shared or exclusive, up to ``capacity``.

    An exclusive ticket needs the queue to itself; shared tickets go in
    together, at most ``capacity`` of them (``None``: no bound).
    """

    __slots__ = ("__weakref__", "_capacity", "_generation", "_holders", "_mutex", "_waiting")

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = capacity
        self._mutex = threading.Lock()
        self._holders: set[Ticket] = set()
        self._waiting: deque[Ticket] = deque()
        self._generation = generation.value

    def _renew_if_forked(self) -> None:
        # In a forked child the holders and waiters are the parent's threads,
        # and the mutex may have been held by one of them at the fork.
        if self._generation != generation.value:
            self._generation = generation.value
            self._mutex = threading.Lock()
            self._holders = set()
            self._waiting = deque()

    def _admits(self, ticket: Ticket) -> bool:
        holders = self._holders
        if not holders:
            return True
        if ticket.exclusive or next(iter(holders)).exclusive:
            return False
        return self._capacity is None or len(holders) < self._capacity

    def enter(
        self,
        ticket: Ticket,
        wait: bool,
        deadline: float | None,
        cancel: CancelEvent | None,
        watch: tuple[object, str] | None,
        *,
        near_deadline: NearDeadline | None = None,
    ) -> bool:
        """Admit ``ticket`` now, or (if ``wait``) once it reaches the head and fits.

        The caller registers :meth:`leave` for ``ticket`` *before* calling, so
        that an exception at any moment (a ``KeyboardInterrupt`` between two
        bytecodes included) is undone by it. Returns whether it was admitted;
        ``watch`` names the wait for the slow-wait log; ``near_deadline``: see
        :func:`.waiting.wait_for`.
        """
        if self._generation != generation.value:
            self._renew_if_forked()
        with self._mutex:
            if not self._waiting and (not self._holders or self._admits(ticket)):
                # In the holders first: an interruption between the two lines
                # leaves a holder that leave() removes, never a lost one.
                self._holders.add(ticket)
                ticket.admitted = True
                return True
            if not wait:
                return False
            ticket.wake = wake = Wake()
            self._waiting.append(ticket)
        wait_for(wake, deadline, cancel, watch, near_deadline)
        # Admitted or not, leave() (already registered) sets things right; an
        # admission that lands after this read is given back by it just the same.
        return ticket.admitted

    def leave(self, ticket: Ticket) -> None:
        """Undo ``ticket``'s place, whichever stage it reached; safe to call again.

        Every step here can be cut short by an interruption and redone (the
        undo stack runs a failed step once more): so each step tests the
        state rather than trusting a flag, and the queue is served whether or
        not this ticket was found.
        """
        if self._generation != generation.value:
            return  # the parent's ticket, in a forked child: nothing of it is here
        with self._mutex:
            if ticket in self._holders:
                self._holders.discard(ticket)
            elif ticket.wake is not None and ticket in self._waiting:
                self._waiting.remove(ticket)
            if self._waiting:
                self._serve()

    def _serve(self) -> None:
        # A departure (even of a waiter that gave up) may let the next ones in.
        # Admitted, then woken, then dequeued: redone after an interruption at
        # any line, this neither loses the head nor admits it twice.
        waiting = self._waiting
        while waiting:
            head = waiting[0]
            if head not in self._holders:
                if not self._admits(head):
                    return
                self._holders.add(head)
            head.admitted = True
            if head.wake is not None:
                head.wake.set()
            waiting.popleft()

    def held_by(self, thread: int) -> bool:
        """Whether ``thread`` holds a place in this queue now."""
        self._renew_if_forked()
        holders = self._holders
        return bool(holders) and any(ticket.thread == thread for ticket in list(holders))

    @property
    def in_use(self) -> bool:
        """Whether anyone holds or waits for a place."""
        self._renew_if_forked()
        return bool(self._holders or self._waiting)

    def statistics(self) -> QueueStatistics:
        """How many hold a place (exclusively or not) and how many wait, right now."""
        self._renew_if_forked()
        with self._mutex:
            holders = list(self._holders)
            return QueueStatistics(
                holder_threads=tuple(ticket.thread for ticket in holders),
                exclusive=bool(holders) and holders[0].exclusive,
                waiting=len(self._waiting),
                granted_threads=tuple(ticket.thread for ticket in holders if ticket.granted),
            )


_registry_mutex = threading.Lock()
_lock_file_queues: weakref.WeakValueDictionary[FileKey, FairQueue] = weakref.WeakValueDictionary()


def queue_for(key: FileKey) -> FairQueue:
    """The queue of the lock file ``key``, shared by every lock object on that file."""
    with _registry_mutex:
        queue = _lock_file_queues.get(key)
        if queue is None:
            queue = _lock_file_queues[key] = FairQueue()
        return queue


def queues_in_use() -> int:
    """How many lock files this process holds or waits for now."""
    with _registry_mutex:
        queues = list(_lock_file_queues.values())
    return sum(1 for queue in queues if queue.in_use)


def _renew_registry_mutex() -> None:
    global _registry_mutex  # noqa: PLW0603 - a parent thread may have held it at the fork
    _registry_mutex = threading.Lock()


os.register_at_fork(after_in_child=_renew_registry_mutex)
