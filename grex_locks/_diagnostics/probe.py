"""What one inspection sees of the system: the kernel's lock table, open files, processes.

A :class:`Probe` caches what it learns, so that a scan over ten thousand
locks reads the kernel table once and asks about each process once. It is
the lowest layer of judging a lock: the verdict rules (:mod:`.verdicts`), the
looks that confirm them (:mod:`.looks`) and :func:`.judge.judge` all ask
through it, and it knows nothing of them, so it is kept apart from the rules
it serves.
"""

from __future__ import annotations

import pwd
import socket
import time
from pathlib import Path
from typing import Any

from grex_locks._core.lock_file import FileKey

from .diagnosis import Diagnosis, Holder, HolderState, finite_seconds
from .kernel_lock_table import KernelLockTable, ProcessFiles
from .process_tree import proc_stat

#: psutil derives start times from the boot time, which the kernel may report a
#: second apart between readers; a reused pid starts much later than that.
_START_TIME_SLACK = 1.0


class Probe:
    """What one inspection knows: the kernel table, open files, and processes seen so far.

    A scan shares one probe over all its locks, so the kernel table is read
    once and each process is asked about once.
    """

    def __init__(self, table: KernelLockTable | None = None, *, live: bool | None = None) -> None:
        #: Whether :attr:`table` is the kernel's, read for this inspection, so that a
        #: verdict may be confirmed by reading it again (not a snapshot given by a caller).
        self.live = table is None if live is None else live
        self.table = table if table is not None else KernelLockTable.read()
        self.files = ProcessFiles()
        self.hostname = socket.gethostname()
        self.now = time.time()
        self._holders: dict[int, Holder | None] = {}
        self._users: dict[int, str] = {}
        self._ticks: dict[int, int | None] = {}

    def again(self, key: FileKey) -> Probe:
        """A new look at the lock ``key``: its kernel table lines read now, no process known yet.

        What the first look learned about processes (their files, whether
        they live) is not carried over: it may have changed since.
        """
        fresh = Probe(KernelLockTable.read(inode=key[1]), live=True)
        fresh._users = self._users
        return fresh

    def user(self, uid: int) -> str:
        """The name of user ``uid`` (its number if it has none); ``""`` for ``-1``."""
        if uid < 0:
            return ""
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = str(uid)
        return self._users[uid]

    def holder(self, pid: int) -> Holder | None:
        """``pid`` described by psutil (cached); ``None`` if it is not a live process."""
        if pid not in self._holders:
            self._holders[pid] = Holder.of_pid(pid)
        return self._holders[pid]

    def holders(self, pids: list[int]) -> list[Holder]:
        """The live processes among ``pids``, in order, each once."""
        found = (self.holder(pid) for pid in dict.fromkeys(pids))
        return [h for h in found if h is not None]

    def identity(self, pid: int, create_time: float, start_ticks: object = None) -> str:
        """``"alive"`` if ``pid`` is the process started at ``create_time``; else gone/reused.

        ``start_ticks`` (a record's, if it has one) is compared exactly with
        the live process's: ``create_time`` is only good to a second, and a
        busy machine can reuse a pid within it. ``create_time`` is still
        compared, for a record written before the last boot (whose ticks
        count from another boot) and for one without ticks.
        """
        holder = self.holder(pid)
        if holder is None:
            return "gone"
        recorded = finite_seconds(create_time)
        if holder.create_time and (
            recorded is None or abs(holder.create_time - recorded) > _START_TIME_SLACK
        ):
            return "reused"
        if isinstance(start_ticks, int) and not isinstance(start_ticks, bool):
            now = self.start_ticks(pid)
            if now is not None and now != start_ticks:
                return "reused"
        return "alive"

    def identity_of(self, owner: dict[str, Any]) -> str:
        """:meth:`identity` of the process a valid record names."""
        return self.identity(owner["pid"], owner["create_time"], owner.get("start_ticks"))

    def start_ticks(self, pid: int) -> int | None:
        """When ``pid`` started, in clock ticks after boot (cached); ``None`` if unknown."""
        if pid not in self._ticks:
            found = proc_stat(pid)
            self._ticks[pid] = found.start_ticks if found is not None else None
        return self._ticks[pid]

    def readers(self, key: FileKey, waiter_pids: list[int]) -> list[int]:
        """The holders of ``key`` if each holds it shared (says its ``fdinfo``); else ``[]``."""
        pids = self.files.holders(key, [], waiter_pids)
        modes = [self.files.lock_mode(pid, key) for pid in pids]
        return pids if pids and all(mode == "READ" for mode in modes) else []

    def unreadable(self, path: Path, why: str) -> Diagnosis:
        """The diagnosis of a lock (or directory) the system would not let us look at."""
        return Diagnosis(
            path=path,
            state=HolderState.UNREADABLE,
            note=why,
            kernel_visible=self.table.available,
            diagnosed_at=self.now,
        )
