"""``doctor --prune``: the one place diagnostics change a file, removing a dead holder's record.

Only a regular file that reads as an owner record is ever removed, and only
while this process holds its lock (taken without waiting, and let go at
once). Anything else at a record path — a directory, a symlink, a FIFO, a
file that is not an owner record (someone's ``notes.owner`` beside their
``notes``) — is left alone (``grex-locks doctor`` says what to do by hand).
Lock files are never touched.

The record's directory is reached from ``/`` one component at a time,
never through a symlink, and everything after is done relative to it: a
directory swapped for a symlink between the scan and the removal (to point
the removal at another user's files) is refused, not followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from grex_locks._core.owner_record import record_path

from .diagnosis import Diagnosis, HolderState
from .kernel_lock_table import KernelLockTable
from .record_reader import RecordStatus, is_content_problem, read_record_once

# As a lock object opens its lock file: read-only (flock needs no more), never
# through a symlink, never hanging on a FIFO; and never created here.
_LOCK_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# A directory on the way, reached without following a symlink. O_PATH: going
# through a directory needs only its search permission, not read permission.
_DIRECTORY_FLAGS = (
    getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
)


@dataclass(frozen=True)
class PruneOutcome:
    """What ``prune_stale_record`` did with one record, and why."""

    record: Path
    removed: bool
    reason: str


class _Refused(Exception):
    """A record kept: the reason is the message."""


def prune_stale_record(diagnosis: Diagnosis) -> PruneOutcome:
    """Remove the owner record of a lock only while holding that lock itself, briefly.

    A record is rewritten in place by each new holder (same file, often the
    same size, through a mapped page that may not even change its time), so
    no check of the record alone can tell a dead holder's record from a new
    holder's. The lock can: with the lock file's ``flock`` taken here
    (exclusive, without waiting), nobody holds the lock, so whatever record
    sits beside it is a left-over, and no holder can write one until the
    removal is done. A lock held (or waited for) right now is left alone.
    Only a regular file that parses as an owner record is removed. Nothing is
    ever followed through a symlink, and the lock file is never created or
    changed.
    """
    record = record_path(diagnosis.path)
    try:
        directory = _open_directory(record.parent)
    except _Refused as refused:
        return PruneOutcome(record, False, str(refused))
    except OSError as exc:
        return PruneOutcome(record, False, f"cannot inspect: {exc.strerror or exc}")
    try:
        _remove_under_lock(directory, diagnosis.path.name, record.name)
    except _Refused as refused:
        return PruneOutcome(record, False, str(refused))
    finally:
        os.close(directory)
    logger.info("removed stale owner record {}", record)
    return PruneOutcome(record, True, "its lock was free")


def _open_directory(path: Path) -> int:
    """A descriptor of the directory ``path``, reached from ``/`` without following a symlink."""
    fd = os.open("/", _DIRECTORY_FLAGS)
    walked = Path("/")
    try:
        for part in Path(os.path.abspath(path)).parts[1:]:
            walked /= part
            try:
                inner = os.open(part, _DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Refused(
                        f"not removed: {walked} is a symlink or not a directory (changed "
                        "since the scan, or a path through a symlink: give doctor the real "
                        "path); left alone"
                    ) from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_under_lock(directory: int, lock_name: str, record_name: str) -> None:
    """Take the lock without waiting, check the record, remove it; raise _Refused if not."""
    try:
        if not stat.S_ISREG(os.stat(record_name, dir_fd=directory, follow_symlinks=False).st_mode):
            raise _Refused("not a regular file; left alone")
        lock_fd = os.open(lock_name, _LOCK_OPEN_FLAGS, dir_fd=directory)
    except OSError as exc:
        raise _Refused(f"cannot inspect: {exc.strerror or exc}") from None
    try:
        lock = os.fstat(lock_fd)
        table = KernelLockTable.read()
        key = (lock.st_dev, lock.st_ino)
        if table.available and (table.holders(key, kind=None) or table.waiters(key, kind=None)):
            raise _Refused("its lock is held now")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Refused("its lock is held now") from None
        except OSError as exc:
            raise _Refused(f"cannot take its lock: {exc.strerror or exc}") from None
        # Under the lock no holder writes a record: what is read now stays.
        read_key = _check_is_a_record(directory, record_name)
        try:
            now = os.stat(record_name, dir_fd=directory, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != read_key:
                raise _Refused("replaced while it was being checked; left alone")
            os.unlink(record_name, dir_fd=directory)
        except OSError as exc:
            raise _Refused(f"cannot remove: {exc.strerror or exc}") from None
    finally:
        os.close(lock_fd)  # which also lets go of the lock, if taken


def _check_is_a_record(directory: int, record_name: str) -> tuple[int, int]:
    """The record file's identity, once its bytes read as an owner record; else _Refused."""
    read = read_record_once(record_name, dir_fd=directory)
    if read.file_type:
        raise _Refused("not a regular file; left alone")
    if read.status is RecordStatus.UNREADABLE and is_content_problem(read.problem):
        raise _Refused(
            f"not an owner record ({read.problem}): maybe not grex_locks' file; left alone "
            "(remove it by hand if it is a record)"
        )
    if read.key is None:
        raise _Refused(f"cannot read it: {read.problem or 'it is gone'}")
    return read.key


def stale_records(diagnoses: Iterable[Diagnosis]) -> list[Diagnosis]:
    """The diagnoses whose lock is free but whose record was left behind."""
    return [d for d in diagnoses if d.state is HolderState.STALE_RECORD]
