"""The operating-system lock: ``flock(2)`` through portalocker, nothing more.

A thin layer in the portalocker spirit: it speaks in descriptors and
booleans, and converts every ``OSError`` into :class:`LockIOError` once,
here. ``FlockLocker`` is pinned so that no global setting of portalocker's
can switch these locks to ``lockf`` (whose locks threads silently share and
which util-linux ``flock(1)`` and grex's Rust core would not see).
"""

from __future__ import annotations

from pathlib import Path

import portalocker
from portalocker.portalocker import FlockLocker

from grex_locks.errors import LockIOError

_locker = FlockLocker()
_EXCLUSIVE = portalocker.LockFlags.EXCLUSIVE
_SHARED = portalocker.LockFlags.SHARED
_NON_BLOCKING = portalocker.LockFlags.NON_BLOCKING


# Combined once: IntFlag arithmetic per call would cost as much as the flock.
_BLOCKING_FLAGS = {True: _SHARED, False: _EXCLUSIVE}
_TRY_FLAGS = {True: _SHARED | _NON_BLOCKING, False: _EXCLUSIVE | _NON_BLOCKING}


def _io_error(path: Path, what: str, exc: portalocker.LockException) -> LockIOError:
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    error = LockIOError(path, f"cannot {what} lock file {path}: {cause}")
    error.__cause__ = cause
    return error


def try_lock(fd: int, path: Path, *, shared: bool) -> bool:
    """Take the lock on ``fd`` if nobody holds a conflicting one; never wait."""
    try:
        _locker.lock(fd, _TRY_FLAGS[shared])
    except portalocker.AlreadyLocked:
        return False
    except portalocker.LockException as exc:
        raise _io_error(path, "lock", exc) from None
    return True


def lock_blocking(fd: int, path: Path, *, shared: bool) -> None:
    """Block in the kernel until the lock on ``fd`` is granted.

    The kernel wakes the waiter the moment the holder lets go: no polling. In
    the main thread a signal handler that raises (``KeyboardInterrupt``)
    interrupts the wait.
    """
    try:
        _locker.lock(fd, _BLOCKING_FLAGS[shared])
    except portalocker.LockException as exc:
        raise _io_error(path, "lock", exc) from None


def unlock(fd: int, path: Path) -> None:
    """Release whatever lock ``fd``'s open file description holds."""
    try:
        _locker.unlock(fd)
    except portalocker.LockException as exc:
        raise _io_error(path, "unlock", exc) from None
