"""The in-process gate in front of every lock file: threads queue here first.

One :class:`Gate` per lock file *identity* (``st_dev``, ``st_ino``), kept in a
process-wide registry only while somebody holds or waits on it, so a run
over 100,000 packs does not grow it. The gate serialises the threads of this
process before they touch the OS lock — leaving the kernel only
cross-process contention — and knows which thread holds what, so a thread
that asks again for a lock it holds is refused at once instead of
deadlocking on itself.

Waiters are served first in, first out, readers at the head of the queue
together: a writer in the queue holds back the readers that came after it,
so a stream of readers cannot starve a writer within one process.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from . import slow_waits
from .lockfile import FileKey
from .undo import Undo
from .waiting import CancelEvent, is_cancelled, wait_for


@dataclass(eq=False)
class _Waiter:
    thread: int
    shared: bool
    wake: threading.Event = field(default_factory=threading.Event)
    granted: bool = False


@dataclass(eq=False)
class Gate:
    """Who in this process holds one lock file, and who waits for it."""

    key: FileKey
    writer: int | None = None
    readers: Counter[int] = field(default_factory=Counter)
    queue: deque[_Waiter] = field(default_factory=deque)

    def held_by(self, thread: int) -> bool:
        return self.writer == thread or thread in self.readers

    def _admits(self, shared: bool) -> bool:
        if shared:
            return self.writer is None
        return self.writer is None and not self.readers

    def _admit(self, thread: int, shared: bool) -> None:
        if shared:
            self.readers[thread] += 1
        else:
            self.writer = thread

    def _serve_queue(self) -> None:
        while self.queue and self._admits(self.queue[0].shared):
            waiter = self.queue.popleft()
            self._admit(waiter.thread, waiter.shared)
            waiter.granted = True
            waiter.wake.set()

    def _unused(self) -> bool:
        return self.writer is None and not self.readers and not self.queue


_mutex = threading.Lock()
_gates: dict[FileKey, Gate] = {}


class GateOutcome:
    """Why :func:`enter` did not admit the caller."""

    REENTRY = "re-entry"
    BUSY = "busy"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class NotAdmitted(Exception):
    """Raised by :func:`enter`; the caller turns ``outcome`` into a public error."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def held_by_current_thread(key: FileKey) -> bool:
    """Whether the calling thread holds the lock file ``key`` in this process."""
    with _mutex:
        gate = _gates.get(key)
        return gate is not None and gate.held_by(threading.get_ident())


def enter(
    stack: Undo,
    key: FileKey,
    *,
    shared: bool,
    wait: bool,
    deadline: float | None,
    cancel: CancelEvent | None,
    watch: tuple[Path, str],
) -> None:
    """Admit the calling thread to ``key``'s gate, waiting in line if ``wait``.

    On admission the matching :func:`_leave` is registered on ``stack``.
    Raises :class:`NotAdmitted` otherwise, leaving nothing behind.
    """
    me = threading.get_ident()
    with _mutex:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = Gate(key)
        if gate.held_by(me):
            raise NotAdmitted(GateOutcome.REENTRY)
        if not gate.queue and gate._admits(shared):
            gate._admit(me, shared)
            stack.callback(_leave, key, me, shared)
            return
        if not wait:
            if gate._unused():
                del _gates[key]
            raise NotAdmitted(GateOutcome.BUSY)
        waiter = _Waiter(me, shared)
        gate.queue.append(waiter)
    try:
        with slow_waits.watching(*watch):
            wait_for(waiter.wake, deadline, cancel)
    except BaseException:
        if _withdraw(gate, waiter):
            _leave(key, me, shared)
        raise
    if not _withdraw(gate, waiter):
        raise NotAdmitted(GateOutcome.CANCELLED if is_cancelled(cancel) else GateOutcome.TIMEOUT)
    stack.callback(_leave, key, me, shared)


def _withdraw(gate: Gate, waiter: _Waiter) -> bool:
    """End a wait: True if the waiter was granted in time, else take it out of line."""
    with _mutex:
        if waiter.granted:
            return True
        gate.queue.remove(waiter)
        # A writer leaving the head of the line may let the readers behind it in.
        gate._serve_queue()
        if gate._unused():
            _gates.pop(gate.key, None)
        return False


def _leave(key: FileKey, thread: int, shared: bool) -> None:
    with _mutex:
        gate = _gates[key]
        if shared:
            gate.readers[thread] -= 1
            if gate.readers[thread] <= 0:
                del gate.readers[thread]
        else:
            gate.writer = None
        gate._serve_queue()
        if gate._unused():
            del _gates[key]


def registry_size() -> int:
    """How many lock files this process's gate registry tracks now."""
    with _mutex:
        return len(_gates)


def reset_after_fork() -> None:
    """In a forked child: forget every gate; the child holds nothing.

    The mutex is replaced too: another thread of the parent may have held it
    at the moment of the fork, and that thread does not exist in the child.
    """
    global _mutex  # noqa: PLW0603 - recreated after fork, see docstring
    _mutex = threading.Lock()
    _gates.clear()
