"""``doctor --prune``: the one place diagnostics change a file, removing a dead holder's record.

Only a regular file is ever removed, and only when the kernel shows its lock
free at that very moment; a directory, symlink or FIFO at a record path is
left alone (``grex-locks doctor`` says what to do by hand). Lock files are
never touched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from grex_locks._core.owner_record import record_path

from .diagnosis import Diagnosis, HolderState
from .kernel_lock_table import KernelLockTable


@dataclass(frozen=True)
class PruneOutcome:
    """What ``prune_stale_record`` did with one record, and why."""

    record: Path
    removed: bool
    reason: str


def prune_stale_record(diagnosis: Diagnosis) -> PruneOutcome:  # noqa: PLR0911 - one per refusal
    """Remove the owner record of a lock only if the kernel shows that lock free right now.

    The check is redone here, immediately before the removal: the lock file's
    current identity against a fresh read of the kernel's table, and the
    record's identity before and after that read, so a record a new holder
    wrote meanwhile (always a new file, renamed into place) is left alone.
    Only a regular file is removed; a symlink or FIFO at the record path is
    reported and kept. Nothing is ever followed through a symlink.
    """
    record = record_path(diagnosis.path)
    try:
        before = os.lstat(record)
        lock = os.stat(diagnosis.path)
    except OSError as exc:
        return PruneOutcome(record, False, f"cannot inspect: {exc.strerror or exc}")
    if not stat.S_ISREG(before.st_mode):
        return PruneOutcome(record, False, "not a regular file; left alone")
    table = KernelLockTable.read()
    if not table.available:
        return PruneOutcome(record, False, f"cannot verify the lock is free: {table.reason}")
    key = (lock.st_dev, lock.st_ino)
    if table.holders(key, kind=None) or table.waiters(key, kind=None):
        return PruneOutcome(record, False, "its lock is held now")
    try:
        after = os.lstat(record)
        if (after.st_dev, after.st_ino, after.st_mtime_ns, after.st_size) != (
            before.st_dev,
            before.st_ino,
            before.st_mtime_ns,
            before.st_size,
        ):
            return PruneOutcome(record, False, "it changed while being checked")
        os.unlink(record)
    except OSError as exc:
        return PruneOutcome(record, False, f"cannot remove: {exc.strerror or exc}")
    logger.info("removed stale owner record {}", record)
    return PruneOutcome(record, True, "its lock was free")


def stale_records(diagnoses: Iterable[Diagnosis]) -> list[Diagnosis]:
    """The diagnoses whose lock is free but whose record was left behind."""
    return [d for d in diagnoses if d.state is HolderState.STALE_RECORD]
