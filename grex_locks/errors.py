"""The exceptions grex_locks raises: one tree, every member picklable.

Each error's ``str()`` is a sentence a person can act on: which lock, and,
when it is known, who holds it and for how long. Errors cross process
boundaries (``concurrent.futures`` pickles a worker's exception), so each
class rebuilds itself from its constructor arguments in ``__reduce__``, and
brings along what plain exceptions lose on the way: its ``__cause__`` (a
``LockIOError``'s ``OSError``), its ``__context__``, and attributes set
after construction (``add_note``'s notes). A cause that does not pickle
travels as a plain ``Exception`` carrying its ``repr``, so the error always
pickles.

A ``ProcessPoolExecutor`` then sets ``__cause__`` of whatever a worker
raised to the worker's formatted traceback (the standard library does that
to every exception); the error's own cause is still its ``__context__``
(a copy of an error with a cause and no context gets the cause as its
context too), and is shown in that traceback.
"""

from __future__ import annotations

import pickle
import reprlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core.tiers import Tier
    from ._diagnostics.diagnosis import Diagnosis


def _holder_clause(holder: Diagnosis | None) -> str:
    if holder is None:
        return ""
    summary = holder.holder_summary()
    return f": {summary}" if summary else ""


_probing = threading.local()
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200


def _portable(linked: BaseException | None) -> BaseException | None:
    """``linked`` if it pickles, else a plain ``Exception`` carrying its ``repr``.

    Trying is the only reliable test of picklability. An error met again
    while its chain is being tried (a cause of a cause, a cycle) is not tried
    again: the outermost try covers the whole chain.
    """
    if linked is None or getattr(_probing, "active", False):
        return linked
    _probing.active = True
    try:
        pickle.dumps(linked)
    except Exception:  # noqa: BLE001 - anything that stops it pickling: carry its repr instead
        try:
            text = _REPR.repr(linked)
        except Exception:  # noqa: BLE001 - a repr that fails still leaves the type
            text = f"<{type(linked).__qualname__}>"
        return Exception(f"{type(linked).__module__}.{text} (not picklable; shown as its repr)")
    finally:
        _probing.active = False
    return linked


class LockError(Exception):
    """Base of every grex_locks error; ``.path`` names the lock file."""

    def __init__(self, path: Path | str | None, message: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.message = message
        super().__init__(message or f"lock error on {self.path}")

    def __str__(self) -> str:
        return self.message or f"lock error on {self.path}"

    def _init_args(self) -> tuple[Any, ...]:
        """The constructor arguments that rebuild this error."""
        return (self.path, self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # The constructor rebuilds the error; the state brings back what it
        # cannot: attributes set since (notes), and the chain of causes.
        args = self._init_args()  # first: reading them may settle attributes (see Scheduler's)
        state: dict[str, Any] = dict(self.__dict__)
        cause = _portable(self.__cause__)
        # A pool replaces __cause__ when it brings a worker's error back; the
        # context is left alone, so it carries the cause when there is no other.
        context = _portable(self.__context__) if self.__context__ is not None else cause
        if context is not None:
            state["__context__"] = context
        if cause is not None:
            state["__cause__"] = cause
        if self.__suppress_context__:
            state["__suppress_context__"] = True
        # BaseException.__setstate__ sets each in this order: __suppress_context__
        # comes after __cause__, whose setting turns it on.
        return (type(self), args, state)


class LockBusy(LockError):
    """A lock could not be taken without waiting: someone holds it.

    Raised by ``try_acquire()`` when another holder has the lock, and by every
    acquire when the calling thread already holds the lock (re-entry would
    otherwise deadlock). ``.holder`` is a :class:`Diagnosis` of the lock at the
    moment of the failure, or ``None`` when none could be made.
    """

    def __init__(
        self,
        path: Path | str | None,
        message: str = "",
        holder: Diagnosis | None = None,
    ) -> None:
        self.holder = holder
        super().__init__(path, message or f"{path} is busy{_holder_clause(holder)}")

    def _init_args(self) -> tuple[Any, ...]:
        return (self.path, self.message, self.holder)


class WorkspaceBusy(LockBusy):
    """A workspace sync lock is held: two syncs on one workspace are an error."""


class LockTimeout(LockError, TimeoutError):
    """``timeout=`` ran out before the lock was granted.

    ``.waited`` is how many seconds the caller waited; ``.holder`` is a
    :class:`Diagnosis` of the lock when the wait ended.
    """

    def __init__(
        self,
        path: Path | str | None,
        message: str = "",
        holder: Diagnosis | None = None,
        waited: float = 0.0,
    ) -> None:
        self.holder = holder
        self.waited = waited
        super().__init__(
            path,
            message or f"timed out after {waited:.3f} s waiting for {path}{_holder_clause(holder)}",
        )

    def _init_args(self) -> tuple[Any, ...]:
        return (self.path, self.message, self.holder, self.waited)


class LockCancelled(LockError):
    """The ``cancel=`` event was set before the lock was granted."""

    def __init__(self, path: Path | str | None, message: str = "") -> None:
        super().__init__(path, message or f"waiting for lock {path} was cancelled")


class TierViolation(LockError):
    """A thread asked for a tier at or below one it already holds.

    ``.held`` is the highest tier the thread holds, ``.requested`` the one it
    asked for. Taking locks in one global order is what rules out deadlock,
    so this is raised before any waiting.
    """

    def __init__(
        self,
        path: Path | str | None,
        held: Tier,
        requested: Tier,
        message: str = "",
    ) -> None:
        self.held = held
        self.requested = requested
        super().__init__(
            path,
            message
            or (
                f"lock order violated: {requested.name} (tier {int(requested)}) requested"
                f"{f' for {path}' if path is not None else ''} while this thread holds "
                f"{held.name} (tier {int(held)}); take locks "
                "outer to inner (WORKSPACE_SYNC, SEMAPHORE, PER_PACK, BACKEND, MANIFEST), "
                "and several of one tier together with acquire_all()"
            ),
        )

    def _init_args(self) -> tuple[Any, ...]:
        return (self.path, self.held, self.requested, self.message)


class LockIOError(LockError):
    """The operating system refused to open or lock the lock file.

    The ``OSError`` is the ``__cause__``; ``.path`` is the lock file. When a
    ``ProcessPoolExecutor`` brings the error back from a worker, the pool
    makes the worker's traceback the ``__cause__``, and the ``OSError`` is
    the ``__context__``.
    """

    def __init__(self, path: Path | str | None, message: str = "") -> None:
        super().__init__(path, message or f"cannot use lock file {path}")


class TierOrderWarning(UserWarning):
    """The lock order was broken while the tier check mode is ``"warn"``.

    Issued through :mod:`warnings`, so it is shown once per call site unless
    the program filters it; ``"raise"`` mode raises :class:`TierViolation`
    instead, and ``"off"`` says nothing.
    """
