"""Every grex lock under a directory, diagnosed at once, and the processes deadlocked on them.

A scan walks the tree once without following symlinked directories, reads
the kernel's lock table once, reads an owner record only where the
directory listing shows one, and asks psutil only about the processes that
hold, wait or are named by a record — so ten thousand free locks cost ten
thousand ``lstat`` calls and nothing more. It also looks for wait-for
cycles among processes (A holds X and waits for Y while B holds Y and waits
for X), which the tier order rules out for grex_locks alone but a foreign
tool or a disabled tier check can still build.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from grex_locks._core.owner_record import OWNER_SUFFIX

from .diagnose import inspect
from .diagnosis import Diagnosis, HolderState
from .kernel_lock_table import KernelLockTable
from .lock_names import LOCK_FILE_NAMES, is_lock_name
from .probe import Probe
from .record_reader import RecordRead, RecordStatus, os_problem

_NO_RECORD = RecordRead(RecordStatus.MISSING)
#: Never descended into: git's own metadata holds no grex lock and many files.
SKIPPED_DIRS = frozenset({".git"})


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
    """The diagnoses of a scan, sorted by path, with the wait-for cycles found among them.

    What could not be looked at (a directory that could not be listed, a
    lock file that could not be examined) is in the list too, as an
    ``UNREADABLE`` diagnosis naming the error and the path; :attr:`unreadable`
    lists those.
    """

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

    @property
    def unreadable(self) -> list[Diagnosis]:
        """What the scan could not look at: the ``UNREADABLE`` diagnoses."""
        return [d for d in self if d.state is HolderState.UNREADABLE]


@dataclass(frozen=True)
class Found:
    """One thing a directory listing turned up: a lock file, or what could not be looked at.

    ``st`` is its ``lstat`` (``None`` if that failed with ``error``);
    ``has_record`` whether the listing showed an owner record beside it
    (``None``: not known); ``listing`` marks a directory that could not be
    listed.
    """

    path: Path
    st: os.stat_result | None = None
    has_record: bool | None = None
    error: OSError | None = None
    listing: bool = False


def locks_in(directory: Path) -> tuple[list[Found], list[tuple[Path, os.stat_result]]]:
    """The grex lock files directly in ``directory``, and its subdirectories (to walk).

    A lock file is one with a lock file's name (whatever sits there: a
    directory or FIFO at a lock path is reported, not skipped) or a regular
    file with an owner record beside it. A directory that cannot be listed
    is reported (``listing``), along with any lock file found by its fixed
    name in it (a directory may be searchable but not readable).
    """
    found: list[Found] = []
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError as exc:
        found.append(Found(directory, error=exc, listing=True))
        for name in sorted(LOCK_FILE_NAMES):
            try:
                found.append(Found(directory / name, os.lstat(directory / name)))
            except OSError:
                continue
        return found, []
    names = {entry.name for entry in entries}
    subdirs: list[tuple[Path, os.stat_result]] = []
    for entry in entries:
        name = entry.name
        if name.endswith(OWNER_SUFFIX):
            continue
        named = is_lock_name(name)
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if named or name + OWNER_SUFFIX in names:
                found.append(Found(Path(entry.path), error=exc))
            continue
        if stat.S_ISDIR(st.st_mode) and name not in SKIPPED_DIRS:
            subdirs.append((Path(entry.path), st))
        has_record = name + OWNER_SUFFIX in names
        if named or (stat.S_ISREG(st.st_mode) and has_record):
            found.append(Found(Path(entry.path), st, has_record))
    return found, subdirs


def find_lock_files(root: Path) -> Iterator[Found]:
    """Yield every grex lock file under ``root`` (see :func:`locks_in`), and what could not be read.

    Symlinked directories are never followed, and a directory reached twice
    (a bind mount looping back) is walked once.
    """
    pending = [root]
    seen: set[tuple[int, int]] = set()
    while pending:
        found, subdirs = locks_in(pending.pop())
        yield from found
        for directory, st in subdirs:
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                pending.append(directory)


def diagnose_found(found: Found, probe: Probe) -> Diagnosis:
    """The diagnosis of one thing :func:`locks_in` found."""
    if found.error is not None:
        what = "cannot list directory" if found.listing else "cannot look at"
        return probe.unreadable(found.path, f"{what} {found.path}: {os_problem(found.error)}")
    record = _NO_RECORD if found.has_record is False else None
    return inspect(found.path, probe, found.st, record=record)


def scan(root: str | os.PathLike[str], *, table: KernelLockTable | None = None) -> ScanResult:
    """Diagnose every grex lock under ``root``; never takes a lock or changes a file.

    Returns a :class:`ScanResult` (a list of :class:`Diagnosis`, sorted by
    path) whose ``cycles`` lists any wait-for cycles among the processes;
    directories and files that could not be read are in it as
    ``UNREADABLE``. Raises ``FileNotFoundError`` / ``NotADirectoryError`` for
    a bad ``root``.
    """
    base = Path(root).absolute()
    probe = Probe(table)
    try:
        st = os.stat(base)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such directory: {base}") from None
    except OSError as exc:
        found = [diagnose_found(Found(base, error=exc), probe)]
        return ScanResult(found, root=base, kernel_visible=probe.table.available)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"not a directory: {base}")
    diagnoses = [diagnose_found(found, probe) for found in find_lock_files(base)]
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
