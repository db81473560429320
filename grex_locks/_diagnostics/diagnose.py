"""Judging a lock: the kernel's lock table, checked against the owner record.

:func:`diagnose` is the public entry; :func:`judge` is what it and ``scan``
share, given a :class:`Probe` that caches what one inspection learns (the
kernel table, open files, processes), so a scan over ten thousand locks reads
the kernel table once and asks about each process once.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from grex_locks._core.lock_file import FileKey

from .diagnosis import Diagnosis, Holder, HolderState, finite_seconds
from .kernel_lock_table import KernelLock, KernelLockTable, ProcessFiles
from .record_reader import RecordRead, RecordStatus, read_record

#: psutil derives start times from the boot time, which the kernel may report a
#: second apart between readers; a reused pid starts much later than that.
_START_TIME_SLACK = 1.0


class Probe:
    """What one inspection knows: the kernel table, open files, and processes seen so far.

    A scan shares one probe over all its locks, so the kernel table is read
    once and each process is asked about once.
    """

    def __init__(self, table: KernelLockTable | None = None) -> None:
        self.table = table if table is not None else KernelLockTable.read()
        self.files = ProcessFiles()
        self.hostname = socket.gethostname()
        self.now = time.time()
        self._holders: dict[int, Holder | None] = {}

    def holder(self, pid: int) -> Holder | None:
        """``pid`` described by psutil (cached); ``None`` if it is not a live process."""
        if pid not in self._holders:
            self._holders[pid] = Holder.of_pid(pid)
        return self._holders[pid]

    def holders(self, pids: list[int]) -> list[Holder]:
        """The live processes among ``pids``, in order, each once."""
        found = (self.holder(pid) for pid in dict.fromkeys(pids))
        return [h for h in found if h is not None]

    def identity(self, pid: int, create_time: float) -> str:
        """``"alive"`` if ``pid`` is the process started at ``create_time``; else gone/reused."""
        holder = self.holder(pid)
        if holder is None:
            return "gone"
        recorded = finite_seconds(create_time)
        if holder.create_time and (
            recorded is None or abs(holder.create_time - recorded) > _START_TIME_SLACK
        ):
            return "reused"
        return "alive"


@dataclass
class _Verdict:
    state: HolderState
    note: str = ""
    shared: bool = False
    #: The holders when already known; ``None`` means "find them" (if held).
    holder_pids: list[int] | None = None


def _verdict_unseen(record: RecordRead, probe: Probe) -> _Verdict:
    """Without the kernel's table, judge from the record alone (and say so)."""
    owner, note = record.owner, probe.table.reason
    if record.status is not RecordStatus.VALID or owner is None:
        no_record = record.status in (RecordStatus.MISSING, RecordStatus.EMPTY)
        return _Verdict(
            HolderState.FREE if no_record else HolderState.STALE_RECORD, note, False, []
        )
    if probe.identity(owner["pid"], owner["create_time"]) == "alive":
        return _Verdict(HolderState.HELD, note, False, [owner["pid"]])
    return _Verdict(HolderState.STALE_RECORD, note, False, [])


def _verdict_exclusive(
    owner: dict[str, Any], key: FileKey, taker_pids: list[int], probe: Probe
) -> _Verdict:
    """Held exclusively with a valid record: does the recorded process hold it?"""
    pid: int = owner["pid"]
    identity = probe.identity(pid, owner["create_time"])
    if identity == "alive":
        holds = probe.files.holds(pid, key)
        if holds or (holds is None and pid in taker_pids):
            return _Verdict(HolderState.HELD, holder_pids=[pid])
    # The kernel names the pid that took the lock: if that is the recorded
    # (now dead) process, whoever holds it inherited the descriptor.
    took_it = pid in taker_pids or not any(p > 0 for p in taker_pids)
    if identity != "alive" and took_it:
        gone = "now belongs to another process" if identity == "reused" else "has exited"
        return _Verdict(HolderState.ORPHANED, f"pid {pid} {gone}")
    return _Verdict(HolderState.UNKNOWN_HOLDER)


def _holds_per_fdinfo(owner: dict[str, Any], key: FileKey, probe: Probe) -> bool:
    """Whether the live process a record names holds the lock, by its own fdinfo.

    The kernel renders ``/proc/locks`` a page per read and resumes by
    position, so while the table changes a line can be skipped: a lock held
    all along can be missing from it. Before calling a lock with a valid
    record free, ask the recorded process's ``/proc/<pid>/fdinfo``, which is
    exact (and cheap: one process).
    """
    pid: int = owner["pid"]
    return probe.identity(pid, owner["create_time"]) == "alive" and bool(
        probe.files.holds(pid, key)
    )


def _verdict(  # noqa: PLR0911 - one return per row of the state table
    record: RecordRead, key: FileKey, taker_pids: list[int], held: bool, probe: Probe
) -> _Verdict:
    owner = record.owner if record.status is RecordStatus.VALID else None
    no_record = record.status in (RecordStatus.MISSING, RecordStatus.EMPTY)
    hostname = owner.get("hostname") if owner is not None else None
    if isinstance(hostname, str) and hostname != probe.hostname:
        return _Verdict(HolderState.REMOTE, f"recorded on host {hostname}")
    if not probe.table.available:
        return _verdict_unseen(record, probe)
    if not held:
        if owner is not None and _holds_per_fdinfo(owner, key, probe):
            return _Verdict(HolderState.HELD, holder_pids=[owner["pid"]])
        return _Verdict(HolderState.FREE if no_record else HolderState.STALE_RECORD)
    if taker_pids and all(lock.mode == "READ" for lock in probe.table.holders(key)):
        return _Verdict(HolderState.HELD, shared=True)
    if owner is None:
        why = "" if no_record else f"the owner record is unreadable: {record.problem}"
        return _Verdict(HolderState.UNKNOWN_HOLDER, why)
    return _verdict_exclusive(owner, key, taker_pids, probe)


def judge(path: Path, key: FileKey | None, record: RecordRead, probe: Probe) -> Diagnosis:
    """Diagnose the lock file ``path`` (identity ``key``, ``None`` if absent) given its record."""
    base: dict[str, Any] = {
        "path": path,
        "owner": record.owner,
        "record_problem": record.problem,
        "kernel_visible": probe.table.available,
        "diagnosed_at": probe.now,
    }
    if key is None:
        return Diagnosis(state=HolderState.FREE, note="the lock file does not exist", **base)
    if record.status is RecordStatus.MISSING and probe.table.available and key not in probe.table:
        return Diagnosis(state=HolderState.FREE, **base)  # the common case, kept cheap for scans
    granted, waiting = probe.table.holders(key), probe.table.waiters(key)
    taker_pids = [lock.pid for lock in granted]
    waiter_pids = [lock.pid for lock in waiting]
    held = bool(granted or waiting)
    verdict = _verdict(record, key, taker_pids, held, probe)
    pids = verdict.holder_pids
    if pids is None:
        pids = probe.files.holders(key, taker_pids, waiter_pids) if held else []
    return Diagnosis(
        state=verdict.state,
        holders=probe.holders(pids),
        waiters=probe.holders(waiter_pids),
        lock_pids=tuple(dict.fromkeys(taker_pids)),
        shared=verdict.shared,
        note=verdict.note,
        **base,
    )


def file_key(path: Path) -> FileKey | None:
    """The identity of the file at ``path`` (following symlinks), or ``None`` if there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def diagnose(
    lock_file: str | os.PathLike[str], *, table: KernelLockTable | None = None
) -> Diagnosis:
    """Diagnose one lock file without taking it or changing any file; never raises on its record.

    ``table`` is a :class:`KernelLockTable` snapshot to judge against; by
    default the kernel's table is read now. A missing lock file is ``FREE``.
    """
    path = Path(lock_file).absolute()
    key = file_key(path)
    if table is None:
        table = KernelLockTable.read(inode=key[1] if key is not None else None)
    result = judge(path, key, read_record(path), Probe(table))
    logger.debug("{}: {}", path, result.state.name)
    return result


def diagnose_busy(lock_file: Path, key: FileKey) -> Diagnosis:
    """Diagnose a lock that an acquire has just found held, for the error it raises.

    Judged from the owner record and the processes it names, against a lock
    table that says only "held": reading the kernel's real table can take
    milliseconds (it waits for the kernel to quiesce its lock lists), and a
    timeout must return on time. ``grex-locks who`` gives the full picture.
    """
    busy = KernelLockTable([KernelLock(kind="FLOCK", mode="WRITE", pid=0, key=key)])
    return judge(lock_file, key, read_record(lock_file), Probe(busy))
