"""A minimal undo stack: each acquire step registers how to take itself back.

It is :class:`contextlib.ExitStack` reduced to the part the lock pipeline
uses (plain callbacks, run last-in first-out), because an uncontended
acquire+release runs six of them and ``ExitStack``'s generality costs about
as much as the ``flock`` itself. Every callback runs even if an earlier one
fails; the first failure is raised afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from .fork import generation

#: The holds and undo stacks that hold something (a lock, a permit, a group)
#: right now. A hold lasts until it is released or the process ends, like
#: ``flock`` on an open descriptor: the garbage collector must never release a
#: lock because the program dropped its last reference, so they are kept alive
#: here. A dict, so that a caller pins one with a plain store (``holding[x] =
#: None``) after its ``try``, where no signal handler can run: see
#: :func:`held_until_released` and ``LockCore.take``.
holding: dict[object, None] = {}

# A forked child holds nothing: the inherited stacks become garbage there, and
# (being of an older generation) are dropped without running a single step.
os.register_at_fork(after_in_child=holding.clear)


class Undo:
    """Callbacks run newest first on :meth:`close`.

    A stack made before a fork is *disarmed* in the child: closing it there
    drops its steps without running any. Its steps act on descriptors and
    files the parent owns — an unlock, a record clear — and a descriptor
    number the child closed may by then belong to one of the child's own locks.
    """

    __slots__ = ("_generation", "_steps")

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._generation = generation.value

    def push(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Register ``fn(*args)`` to run when this stack unwinds."""
        self._steps.append((fn, args))

    @property
    def pending(self) -> bool:
        """Whether callbacks remain (an interruption cut a :meth:`close` short)."""
        return bool(self._steps)

    def close(self) -> None:
        """Run every callback, newest first; raise the first failure at the end.

        A callback that fails is run once more before moving on: an
        asynchronous exception (``KeyboardInterrupt`` from a signal handler)
        can strike as a callback starts, before it has done its work. Every
        callback registered by the lock pipeline is idempotent, so a second
        run is safe. A step is dropped only after it has run.
        """
        if self._generation != generation.value:
            self._steps = []
            return
        first_error: BaseException | None = None
        steps = self._steps
        while steps:
            fn, args = steps[-1]
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - keep unwinding, re-raise below
                if first_error is None:
                    first_error = exc
                with contextlib.suppress(BaseException):
                    fn(*args)
            steps.pop()
        holding.pop(self, None)
        if first_error is not None:
            raise first_error

    def close_fully(self) -> None:
        """:meth:`close`, resumed until no callback is left; then raise the first failure.

        An asynchronous exception can cut :meth:`close` short between two
        callbacks (steps that were not run stay on the stack); this goes on
        with them. It narrows the window in which a signal handler's exception
        can skip an undo to a few bytecodes; closing it entirely is beyond
        Python code, which cannot mask its own signal handlers.
        """
        first_error: BaseException | None = None
        while True:
            try:
                while self._steps:
                    self.close()
                break
            except BaseException as exc:  # noqa: BLE001 - finish unwinding, re-raise below
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def close_quietly(self) -> None:
        """:meth:`close_fully` for an acquire that failed: the error that stopped it is the
        one to see, not an undo step's."""
        with contextlib.suppress(BaseException):
            self.close_fully()

    def __del__(self) -> None:
        # The last line of defence: an asynchronous exception that struck
        # where no handler could finish the unwinding (at the entry of
        # ``__exit__``, say) leaves steps on a stack nobody references any
        # more. Run them now rather than leave a lock held for good.
        if getattr(self, "_steps", None):
            with contextlib.suppress(BaseException):
                self.close_fully()


_Handle = TypeVar("_Handle", bound="ReleasedOnExit")


def held_until_released(acquire: Callable[[Undo], _Handle]) -> _Handle:
    """Run ``acquire`` on a new stack; return its handle with the stack kept until released.

    Any exception in ``acquire`` unwinds what it did. The stack is pinned by
    a plain store after the ``try`` (where no signal handler can run), so an
    interruption can never leave a kept stack that no caller received.
    """
    undo = Undo()
    try:
        handle = acquire(undo)
    except BaseException:
        undo.close_quietly()
        raise
    holding[undo] = None
    return handle


class ReleasedOnExit:
    """A context manager whose exit calls :meth:`release`."""

    __slots__ = ()

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class UndoHandle(ReleasedOnExit):
    """What a successful multi-step acquire returns: its undo stack, released once.

    Only the thread that acquired may release (as with ``threading.Lock``
    owners); a second release is a ``RuntimeError``. ``what`` names the
    thing held, for those messages.
    """

    __slots__ = ("_generation", "_thread", "_undo", "_what")

    def __init__(self, undo: Undo, what: str) -> None:
        self._undo: Undo | None = undo
        self._thread = threading.get_ident()
        self._what = what
        self._generation = generation.value

    def release(self) -> None:
        """Undo the acquire, last step first; only the acquiring thread may, and only once.

        In a forked child, releasing one inherited from the parent does
        nothing, however often: what it holds is the parent's.
        """
        if self._generation != generation.value:
            self._undo = None
            return
        if self._undo is None:
            raise RuntimeError(f"this {self._what} was already released")
        if threading.get_ident() != self._thread:
            raise RuntimeError(f"a {self._what} must be released by the thread that acquired it")
        self._close_undo()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"a {self._what} belongs to the thread that acquired it and cannot be sent to "
            "another process; send what it was acquired from (a lock object, or a Scheduler "
            "with a slots_dir), which arrives as a fresh, unheld one"
        )

    def _close_undo(self) -> None:
        undo = self._undo
        if undo is None:
            return
        try:
            undo.close_fully()
        finally:
            # Kept until every step ran: a release cut short by an
            # interruption is finished by calling release() again.
            if not undo.pending:
                self._undo = None
