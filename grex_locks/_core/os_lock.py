"""The operating-system lock: ``flock(2)``, and nothing more.

A thin layer in the portalocker spirit: it speaks in descriptors and
booleans, and converts every ``OSError`` into :class:`LockIOError` once,
here. The blocking wait goes through portalocker's ``FlockLocker``, pinned so
that no global setting of portalocker's can switch these locks to ``lockf``
(whose locks threads silently share and which util-linux ``flock(1)`` and
grex's Rust core would not see). The two calls on every uncontended
acquire and release — the non-blocking attempt and the unlock — call
``fcntl.flock`` directly with flags combined once: portalocker's per-call
flag arithmetic costs as much as the system call itself.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import portalocker
from portalocker.portalocker import FlockLocker

from grex_locks.errors import LockIOError

_locker = FlockLocker()
_BLOCKING_FLAGS = {True: portalocker.LockFlags.SHARED, False: portalocker.LockFlags.EXCLUSIVE}
_TRY_FLAGS = {True: fcntl.LOCK_SH | fcntl.LOCK_NB, False: fcntl.LOCK_EX | fcntl.LOCK_NB}
_flock = fcntl.flock
_UNLOCK = fcntl.LOCK_UN


def _io_error(path: Path, what: str, cause: BaseException) -> LockIOError:
    # Raised "from cause": the OSError is the error's __cause__ (API).
    return LockIOError(path, f"cannot {what} lock file {path}: {cause}")


def try_lock(fd: int, path: Path, shared: bool) -> bool:
    """Take the lock on ``fd`` if nobody holds a conflicting one; never wait."""
    try:
        _flock(fd, _TRY_FLAGS[shared])
    except BlockingIOError:
        return False
    except OSError as exc:
        raise _io_error(path, "lock", exc) from exc
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
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
        raise _io_error(path, "lock", cause) from cause


def unlock(fd: int, path: Path) -> None:
    """Release whatever lock ``fd``'s open file description holds."""
    try:
        _flock(fd, _UNLOCK)
    except OSError as exc:
        raise _io_error(path, "unlock", exc) from exc
