"""The four file locks of grex, each a configuration of the one primitive.

They differ only in where the lock file lives, their tier, whether they
wait, and whether they can be shared; everything else — gate, flock, owner
record, tier check, fork safety, pickling — is :class:`_FileLock`'s, once.
"""

from __future__ import annotations

import functools
import os
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ._core.kernel_wait import blocked_on
from ._core.primitive import Hold, LockCore
from ._core.tiers import Tier
from ._core.waiting import CancelEvent, deadline_after
from ._holder_errors import EarlyDiagnosis, holder_of, refusal
from .errors import LockBusy, WorkspaceBusy

PACK_LOCK_FILE_NAME = ".grex-lock"
SYNC_LOCK_FILE_NAME = ".grex.sync.lock"
BACKEND_LOCK_SUFFIX = ".grex-backend.lock"
MANIFEST_LOCK_FILE_NAME = ".grex.lock"

StrPath = str | os.PathLike[str]
_T = TypeVar("_T")

#: ``repr`` for error messages: whole for anything ordinary, cut short when huge.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


#: Serialises the first use of unpickled locks and schedulers (see :func:`opened_at_first_use`).
_first_use = threading.Lock()


def _renew_first_use() -> None:
    global _first_use  # noqa: PLW0603 - a parent thread may have held it at the fork
    _first_use = threading.Lock()


os.register_at_fork(after_in_child=_renew_first_use)


def opened_at_first_use(owner: object, attribute: str, opener: Callable[[], _T]) -> _T:
    """``owner``'s ``attribute``, made by ``opener`` and stored, if no thread stored it first.

    For objects rebuilt by unpickling, which open their files at first use
    (see :func:`_unpickled`): two threads using one for the first time at
    once must share what is opened (each would otherwise hold and release
    through its own), so it is stored under one mutex.
    """
    with _first_use:
        found: _T | None = owner.__dict__.get(attribute)
        if found is None:
            found = owner.__dict__[attribute] = opener()
        return found


def _describe(value: object) -> str:
    """``value`` in an error message: its (shortened) repr and its type."""
    return f"{_REPR.repr(value)} ({type(value).__name__})"


@dataclass(frozen=True)
class LockStatistics:
    """A snapshot of one lock file as this process sees it (``lock.statistics()``).

    Other processes are not counted: ``grex_locks.diagnose`` asks the kernel
    about them.
    """

    #: Whether this lock object holds the lock (in some thread).
    held: bool
    #: Names of this process's threads that hold the lock file, through any lock object.
    holder_threads: tuple[str, ...]
    #: Whether the lock file is held exclusively by a thread of this process.
    exclusive: bool
    #: Threads of this process queued for the lock file, first come first served.
    threads_waiting: int
    #: Helper threads of this process blocked in ``flock`` on it (waits with a
    #: timeout or cancel event, and waits that gave up and are left behind).
    kernel_waiters: int


class _FileLock:
    """A grex lock on one file: threads and processes exclude each other.

    Subclasses set the class attributes and :meth:`_lock_file`; nothing else.
    """

    _tier: ClassVar[Tier]
    _kind: ClassVar[str]
    _busy_error: ClassVar[type[LockBusy]] = LockBusy
    _waits: ClassVar[bool] = True

    def __init__(self, target: StrPath) -> None:
        self._target = _absolute(target, type(self).__name__)
        #: The holds each thread's ``with`` blocks took, innermost last, for their
        #: exits to release. A stack: a forked child may enter a block of its own
        #: inside one it inherited from its parent (same thread ident).
        self._entered: dict[int, list[Hold]] = {}
        # Opened here, so that the constructor raises LockIOError when the OS
        # refuses; a lock unpickled in another process opens it at first use.
        self._core = self._open_core()

    @functools.cached_property
    def _core(self) -> LockCore:
        # Reached only by a lock rebuilt by unpickling: the constructor sets it.
        return opened_at_first_use(self, "_core", self._open_core)

    def _open_core(self) -> LockCore:
        return LockCore(
            self._lock_file(self._target),
            tier=self._tier,
            kind=self._kind,
            busy_error=self._busy_error,
        )

    @staticmethod
    def _lock_file(target: Path) -> Path:
        raise NotImplementedError

    @property
    def path(self) -> Path:
        """The lock file, as an absolute path."""
        return self._core.path

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._core.held

    def acquire(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Hold:
        """Block until the lock is held; return a context manager that releases it.

        ``timeout`` (seconds; 0 means one try; ``None`` or ``math.inf``: no
        limit) raises :class:`LockTimeout` when it runs out; setting ``cancel``
        (an event: anything with ``is_set()`` and ``wait(timeout)``, else a
        ``TypeError``) raises :class:`LockCancelled` promptly, even while
        another process holds the lock.
        """
        if timeout is None and cancel is None:
            return self._take(wait=self._waits)  # the common call: nothing to check
        return self._take(
            wait=self._waits, deadline=deadline_after(timeout), cancel=_checked_cancel(cancel)
        )

    def try_acquire(self) -> Hold:
        """Take the lock if it is free right now; raise :class:`LockBusy` otherwise."""
        return self._take(wait=False)

    def _take(
        self,
        *,
        shared: bool = False,
        wait: bool,
        deadline: float | None = None,
        cancel: CancelEvent | None = None,
        tier_taken: bool = False,
        started: float | None = None,
    ) -> Hold:
        """The one way every public acquire goes: the core's take, or an error naming the holder.

        ``started`` is when the caller began waiting (``acquire_all``: for the
        whole group), for the error's ``waited``; by default, now.
        """
        if started is None:
            started = time.monotonic()
        core = self._core
        # Not with a cancel event: a cancel set while the early diagnosis
        # runs would be seen only once it is done.
        early = None
        if wait and deadline is not None and cancel is None:
            early = EarlyDiagnosis(core.path, core.key)
        hold = core.take(
            shared=shared,
            wait=wait,
            deadline=deadline,
            cancel=cancel,
            tier_taken=tier_taken,
            near_deadline=early,
        )
        if hold is not None:
            return hold
        raise refusal(
            what=f"{core.kind} {core.path}",
            path=core.path,
            wait=wait,
            started=started,
            cancel=cancel,
            holder=early.holder if early else functools.partial(holder_of, core.path, core.key),
            busy_error=core.busy_error,
        )

    def release(self) -> None:
        """Release the lock this thread took through this object."""
        self._core.release_hold()

    def statistics(self) -> LockStatistics:
        """Who in this process holds this lock file and who waits for it, right now."""
        core = self._core
        queue = core.queue.statistics()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        granted = queue.granted_threads
        # A thread let through the queue but still waiting for the flock (held
        # by another process) waits: it holds nothing yet.
        return LockStatistics(
            held=core.held,
            holder_threads=tuple(names.get(ident, str(ident)) for ident in granted),
            exclusive=queue.exclusive and bool(granted),
            threads_waiting=queue.waiting + queue.holders - len(granted),
            kernel_waiters=blocked_on(core.key),
        )

    def _held_descriptor(self) -> int:
        """The descriptor whose open file description holds the OS lock (for ``run``)."""
        hold = self._core.hold_of_current_thread()
        if hold is None:
            raise RuntimeError(f"{self._kind} {self.path} is not held by this thread")
        return hold.fd

    def __enter__(self) -> _FileLock:
        hold = self._take(wait=self._waits)
        self._entered.setdefault(threading.get_ident(), []).append(hold)
        return self

    def __exit__(self, *exc_info: object) -> None:
        me = threading.get_ident()
        entered = self._entered.get(me)
        if not entered:
            self.release()
            return
        hold = entered.pop()
        if not entered:
            del self._entered[me]
        # A `with` entered before a fork and left in the child releases
        # nothing: Hold.release knows an inherited hold.
        hold.release()

    def __reduce__(self) -> tuple[Any, ...]:
        # A lock travels as its constructor argument, never as a held lock.
        return (_unpickled, (type(self), self._target))

    def __repr__(self) -> str:
        state = "held" if self.held else "free"
        return f"{type(self).__name__}({str(self._target)!r}) <{state}>"


def _unpickled(cls: type[_FileLock], target: Path) -> _FileLock:
    """A lock sent to another process, as new, its file opened at first use there.

    Not by the unpickling: a lock file the OS refuses would then fail the
    unpickling itself, which in a ``ProcessPoolExecutor`` worker kills the
    worker and breaks the whole pool. At first use the refusal is the
    ``LockIOError`` of the call that made it: the task's own error.
    """
    lock = cls.__new__(cls)
    lock._target = target
    lock._entered = {}
    return lock


class PackLock(_FileLock):
    """Exclusive lock on one pack, ``<pack>/.grex-lock`` (tier ``PER_PACK``)."""

    _tier = Tier.PER_PACK
    _kind = "pack lock"

    @staticmethod
    def _lock_file(target: Path) -> Path:
        return target / PACK_LOCK_FILE_NAME


class WorkspaceLock(_FileLock):
    """Workspace sync lock, ``<workspace>/.grex.sync.lock``; never waits.

    Two syncs on one workspace are an error, not a queue: every way of taking
    it raises :class:`WorkspaceBusy` at once while it is held. ``acquire``
    accepts ``timeout`` and ``cancel`` for uniformity and ignores them.
    """

    _tier = Tier.WORKSPACE_SYNC
    _kind = "workspace sync lock"
    _busy_error = WorkspaceBusy
    _waits = False

    @staticmethod
    def _lock_file(target: Path) -> Path:
        return target / SYNC_LOCK_FILE_NAME

    def acquire(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Hold:
        """Take the workspace lock now or raise :class:`WorkspaceBusy`."""
        # Both ignored, but a negative timeout or a cancel that is no event is still an error.
        deadline_after(timeout)
        _checked_cancel(cancel)
        return self._take(wait=False)


class BackendLock(_FileLock):
    """Lock on one repository checkout, ``<dest>.grex-backend.lock`` beside ``<dest>``.

    The lock file is a sibling of ``dest``, so wiping and re-cloning ``dest``
    while it is held changes nothing about the lock.
    """

    _tier = Tier.BACKEND
    _kind = "backend lock"

    @staticmethod
    def _lock_file(target: Path) -> Path:
        if target.name in ("", ".", ".."):
            # "<ws>/sub/.." names a directory whose own name is elsewhere:
            # resolve it, so the lock sits beside the directory it guards.
            target = Path(os.path.realpath(target))
        if not target.name:
            raise ValueError(
                f"BackendLock needs a repository directory with a parent to sit beside, "
                f"not {str(target)!r}"
            )
        return target.with_name(target.name + BACKEND_LOCK_SUFFIX)


class ManifestLock(_FileLock):
    """Readers-writer lock on a manifest (tier ``MANIFEST``), at any path.

    ``read()`` shares with readers in every thread and process; ``write()``,
    ``with``, ``acquire`` and ``try_acquire`` exclude everyone. Within one
    process waiters are served in arrival order, so a writer is never starved
    by a stream of readers. Across processes ``flock`` promises no order: a
    writer in one process can be overtaken by readers in others for as long
    as some reader always holds the lock.
    """

    _tier = Tier.MANIFEST
    _kind = "manifest lock"

    @staticmethod
    def _lock_file(target: Path) -> Path:
        return target

    def read(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Hold:
        """Hold the lock shared (no owner record) until the returned context exits."""
        if timeout is None and cancel is None:
            return self._take(shared=True, wait=True)
        return self._take(
            shared=True, wait=True, deadline=deadline_after(timeout), cancel=_checked_cancel(cancel)
        )

    def write(self, *, timeout: float | None = None, cancel: CancelEvent | None = None) -> Hold:
        """Hold the lock exclusively until the returned context exits."""
        if timeout is None and cancel is None:
            return self._take(wait=True)
        return self.acquire(timeout=timeout, cancel=cancel)


def _absolute(target: StrPath, kind: str) -> Path:
    """``target`` made absolute; an empty path is an error, not the current directory."""
    if isinstance(target, (str, os.PathLike)) and not os.fspath(target):
        raise ValueError(f"{kind} needs a path; got an empty one")
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"{kind} needs a path (str or os.PathLike), not {target!r}")
    return Path(target).absolute()


def _checked_cancel(cancel: CancelEvent | None) -> CancelEvent | None:
    """``cancel`` if it can be a cancel event (or is ``None``); a ``TypeError`` at the call if not.

    Only the shape is checked: an event whose ``is_set()`` fails later (its
    Manager is gone) still ends the wait as cancelled.
    """
    if cancel is None or (
        callable(getattr(cancel, "is_set", None)) and callable(getattr(cancel, "wait", None))
    ):
        return cancel
    raise TypeError(
        "cancel= takes None or an event: an object with is_set() and wait(timeout), such as "
        "threading.Event or a multiprocessing Manager().Event(); "
        f"got {_describe(cancel)}"
    )
