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

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from . import slow_waits
from .lock_file import FileKey
from .undo import Undo
from .waiting import CancelEvent, wait_for


@dataclass(eq=False)
class _Waiter:
    thread: int
    shared: bool
    # Made only for a waiter that queues: most acquires never wait.
    wake: threading.Event | None = None
    granted: bool = False


@dataclass(eq=False)
class Gate:
    """Who in this process holds one lock file, and who waits for it."""

    key: FileKey
    writer: int | None = None
    # A thread holds a lock file at most once (re-entry is refused), so a set.
    readers: set[int] = field(default_factory=set)
    queue: deque[_Waiter] = field(default_factory=deque)

    def held_by(self, thread: int) -> bool:
        return self.writer == thread or thread in self.readers

    def _admits(self, shared: bool) -> bool:
        if shared:
            return self.writer is None
        return self.writer is None and not self.readers

    def _admit(self, waiter: _Waiter) -> None:
        # Marked granted first: an interruption between the two lines then
        # leaves a waiter that _leave undoes (it only ever removes its own
        # thread), never a holder that nothing will remove.
        waiter.granted = True
        if waiter.shared:
            self.readers.add(waiter.thread)
        else:
            self.writer = waiter.thread

    def _serve_queue(self) -> None:
        while self.queue and self._admits(self.queue[0].shared):
            waiter = self.queue.popleft()
            self._admit(waiter)
            if waiter.wake is not None:
                waiter.wake.set()

    def _unused(self) -> bool:
        return self.writer is None and not self.readers and not self.queue


_mutex = threading.Lock()
_gates: dict[FileKey, Gate] = {}


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
) -> bool:
    """Admit the calling thread to ``key``'s gate, waiting in line if ``wait``.

    The matching :func:`_leave` is registered on ``stack`` *before* anything
    changes, and it undoes whatever stage was reached (nothing, a place in
    line, or admission): so an exception at any moment — a timeout, or a
    ``KeyboardInterrupt`` between two bytecodes — leaves no trace once the
    caller unwinds. Returns whether the thread was admitted. The caller has
    already refused re-entry (a thread holding ``key`` never gets here).
    """
    me = threading.get_ident()
    waiter = _Waiter(me, shared)
    stack.callback(_leave, key, waiter)
    with _mutex:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = Gate(key)
        if not gate.queue and gate._admits(shared):
            gate._admit(waiter)
            return True
        if not wait:
            return False
        waiter.wake = threading.Event()
        gate.queue.append(waiter)
    wait_id = slow_waits.watch(stack, *watch)
    wait_for(waiter.wake, deadline, cancel)
    slow_waits.done(wait_id)
    # Granted or not, _leave (already registered) sets things right; a grant
    # that lands after this check is given back by it just the same.
    return waiter.granted


def _leave(key: FileKey, waiter: _Waiter) -> None:
    """Undo ``waiter``'s stage at the gate, whichever it reached; safe to call twice."""
    with _mutex:
        gate = _gates.get(key)
        if gate is None:
            return
        if waiter in gate.queue:
            gate.queue.remove(waiter)
        elif waiter.granted:
            waiter.granted = False
            if waiter.shared:
                gate.readers.discard(waiter.thread)
            elif gate.writer == waiter.thread:
                gate.writer = None
        # A departure (even of a writer still in line) may let the next ones in.
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


os.register_at_fork(after_in_child=reset_after_fork)
