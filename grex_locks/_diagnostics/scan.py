"""Every grex lock under a directory, diagnosed at once, and the processes deadlocked on them.

A scan walks the tree once without following symlinked directories, reads
the kernel's lock table once, reads an owner record only where the
directory listing shows one, and asks psutil only about the processes that
hold, wait or are named by a record — so ten thousand free locks cost ten
thousand ``lstat`` calls and nothing more. It also looks for wait-for
cycles among processes (A holds X and waits for Y while B holds Y and waits
for X), which the tier order rules out for grex_locks alone but a foreign
tool or a disabled tier check can still build.

``prune_stale_record`` is the one function here that changes a file: the
``doctor --prune`` command's careful removal of a dead holder's record.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from grex_locks._core.owner_record import OWNER_SUFFIX, record_path

from .diagnose import Probe, judge
from .diagnosis import Diagnosis, HolderState
from .kernel_lock_table import KernelLockTable
from .record_reader import RecordRead, RecordStatus, read_record

#: File names that are grex locks wherever they appear.
LOCK_FILE_NAMES = frozenset({".grex-lock", ".grex.sync.lock", ".grex.lock"})
#: A ``BackendLock``'s file ends so, beside the checkout it guards.
BACKEND_SUFFIX = ".grex-backend.lock"
#: Never descended into: git's own metadata holds no grex lock and many files.
SKIPPED_DIRS = frozenset({".git"})

_NO_RECORD = RecordRead(RecordStatus.MISSING)


@dataclass(frozen=True)
class WaitCycle:
    """Processes each waiting for a lock the next one holds: a deadlock the kernel will not break.

    ``pids[i]`` waits for ``locks[i]``, which ``pids[(i + 1) % len(pids)]`` holds.
    """

    pids: tuple[int, ...]
    locks: tuple[Path, ...]

    def describe(self) -> str:
        """The cycle in one line: ``pid 1 waits for X held by pid 2; ...``."""
        steps = []
        for index, pid in enumerate(self.pids):
            after = self.pids[(index + 1) % len(self.pids)]
            steps.append(f"pid {pid} waits for {self.locks[index]} held by pid {after}")
        return "; ".join(steps)


class ScanResult(list[Diagnosis]):
    """The diagnoses of a scan, sorted by path, with the wait-for cycles found among them."""

    def __init__(
        self,
        diagnoses: Iterable[Diagnosis] = (),
        *,
        root: Path | None = None,
        cycles: list[WaitCycle] | None = None,
        kernel_visible: bool = True,
    ) -> None:
        super().__init__(diagnoses)
        self.root = root
        self.cycles: list[WaitCycle] = cycles if cycles is not None else []
        self.kernel_visible = kernel_visible


def is_lock_name(name: str) -> bool:
    """Whether a file called ``name`` is a grex lock by its name alone."""
    return name in LOCK_FILE_NAMES or (name.endswith(BACKEND_SUFFIX) and name != BACKEND_SUFFIX)


def find_lock_files(root: Path) -> Iterator[tuple[Path, os.stat_result, bool]]:
    """Yield ``(path, lstat, has_record)`` for every grex lock file under ``root``.

    Symlinked directories are never followed, and a directory reached twice
    (a bind mount looping back) is walked once.
    """
    pending = [str(root)]
    seen: set[tuple[int, int]] = set()
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError:
            continue
        names = {entry.name for entry in entries}
        for entry in entries:
            name = entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if name not in SKIPPED_DIRS and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    pending.append(entry.path)
                continue
            if not stat.S_ISREG(st.st_mode) or name.endswith(OWNER_SUFFIX):
                continue
            has_record = name + OWNER_SUFFIX in names
            if has_record or is_lock_name(name):
                yield Path(entry.path), st, has_record


def scan(root: str | os.PathLike[str], *, table: KernelLockTable | None = None) -> ScanResult:
    """Diagnose every grex lock under ``root``; never takes a lock or changes a file.

    Returns a :class:`ScanResult` (a list of :class:`Diagnosis`, sorted by
    path) whose ``cycles`` lists any wait-for cycles among the processes.
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a bad ``root``.
    """
    base = Path(root).absolute()
    if not base.is_dir():
        if not base.exists():
            raise FileNotFoundError(f"no such directory: {base}")
        raise NotADirectoryError(f"not a directory: {base}")
    probe = Probe(table)
    diagnoses = [
        judge(path, (st.st_dev, st.st_ino), read_record(path) if has_record else _NO_RECORD, probe)
        for path, st, has_record in find_lock_files(base)
    ]
    diagnoses.sort(key=lambda d: str(d.path))
    cycles = find_wait_cycles(diagnoses)
    logger.debug("scanned {}: {} locks, {} wait-for cycles", base, len(diagnoses), len(cycles))
    return ScanResult(diagnoses, root=base, cycles=cycles, kernel_visible=probe.table.available)


def find_wait_cycles(diagnoses: Iterable[Diagnosis]) -> list[WaitCycle]:
    """The wait-for cycles among processes: each waits for a lock the next one holds.

    A process waiting for a lock it holds itself is not reported: grex_locks
    can leave an abandoned kernel waiter behind in a process that later
    takes the same lock, which is no deadlock.
    """
    edges: dict[int, dict[int, Path]] = {}
    for diagnosis in diagnoses:
        holders = [h.pid for h in diagnosis.holders] or list(diagnosis.lock_pids)
        for waiter in diagnosis.waiters:
            for holder in holders:
                if holder != waiter.pid:
                    edges.setdefault(waiter.pid, {}).setdefault(holder, diagnosis.path)
    cycles: list[WaitCycle] = []
    seen: set[tuple[int, ...]] = set()
    finished: set[int] = set()
    for start in sorted(edges):
        if start in finished:
            continue
        path: list[int] = []
        on_path: dict[int, int] = {}
        stack: list[tuple[int, Iterator[int]]] = [(start, iter(sorted(edges.get(start, {}))))]
        path.append(start)
        on_path[start] = 0
        while stack:
            node, successors = stack[-1]
            following = next(successors, None)
            if following is None:
                stack.pop()
                path.pop()
                del on_path[node]
                finished.add(node)
                continue
            if following in on_path:
                loop = path[on_path[following] :]
                turn = loop.index(min(loop))
                loop = loop[turn:] + loop[:turn]
                if tuple(loop) not in seen:
                    seen.add(tuple(loop))
                    locks = [edges[a][loop[(i + 1) % len(loop)]] for i, a in enumerate(loop)]
                    cycles.append(WaitCycle(tuple(loop), tuple(locks)))
            elif following not in finished:
                on_path[following] = len(path)
                path.append(following)
                stack.append((following, iter(sorted(edges.get(following, {})))))
    return cycles


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
