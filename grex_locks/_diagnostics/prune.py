"""``doctor --prune``: the one place diagnostics change a file, removing a dead holder's record.

Only a regular file is ever removed, and only while this process holds its
lock (taken without waiting, and let go at once); a directory, symlink or FIFO at a record path is
left alone (``grex-locks doctor`` says what to do by hand). Lock files are
never touched.
"""

from __future__ import annotations

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

# As a lock object opens its lock file: read-only (flock needs no more), never
# through a symlink, never hanging on a FIFO; and never created here.
_LOCK_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class PruneOutcome:
    """What ``prune_stale_record`` did with one record, and why."""

    record: Path
    removed: bool
    reason: str


def prune_stale_record(diagnosis: Diagnosis) -> PruneOutcome:  # noqa: PLR0911 - one per refusal
    """Remove the owner record of a lock only while holding that lock itself, briefly.

    A record is rewritten in place by each new holder (same file, often the
    same size, through a mapped page that may not even change its time), so
    no check of the record alone can tell a dead holder's record from a new
    holder's. The lock can: with the lock file's ``flock`` taken here
    (exclusive, without waiting), nobody holds the lock, so whatever record
    sits beside it is a left-over, and no holder can write one until the
    removal is done. A lock held (or waited for) right now is left alone.
    Only a regular file is removed; a symlink or FIFO at the record path is
    reported and kept. Nothing is ever followed through a symlink, and the
    lock file is never created or changed.
    """
    record = record_path(diagnosis.path)
    try:
        if not stat.S_ISREG(os.lstat(record).st_mode):
            return PruneOutcome(record, False, "not a regular file; left alone")
        lock_fd = os.open(diagnosis.path, _LOCK_OPEN_FLAGS)
    except OSError as exc:
        return PruneOutcome(record, False, f"cannot inspect: {exc.strerror or exc}")
    try:
        lock = os.fstat(lock_fd)
        table = KernelLockTable.read()
        key = (lock.st_dev, lock.st_ino)
        if table.available and (table.holders(key, kind=None) or table.waiters(key, kind=None)):
            return PruneOutcome(record, False, "its lock is held now")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return PruneOutcome(record, False, "its lock is held now")
        except OSError as exc:
            return PruneOutcome(record, False, f"cannot take its lock: {exc.strerror or exc}")
        try:
            # Under the lock: any record here is a left-over, but only a
            # regular file is ever removed.
            if not stat.S_ISREG(os.lstat(record).st_mode):
                return PruneOutcome(record, False, "not a regular file; left alone")
            os.unlink(record)
        except OSError as exc:
            return PruneOutcome(record, False, f"cannot remove: {exc.strerror or exc}")
    finally:
        os.close(lock_fd)  # which also lets go of the lock, if taken
    logger.info("removed stale owner record {}", record)
    return PruneOutcome(record, True, "its lock was free")


def stale_records(diagnoses: Iterable[Diagnosis]) -> list[Diagnosis]:
    """The diagnoses whose lock is free but whose record was left behind."""
    return [d for d in diagnoses if d.state is HolderState.STALE_RECORD]
