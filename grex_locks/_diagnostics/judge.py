"""Judging one lock: the kernel's lock table, checked against the owner record.

:func:`judge` is what ``diagnose``, ``scan`` and the errors an acquire
raises share, given a :class:`Probe` that caches what one inspection learns
(the kernel table, open files, processes), so a scan over ten thousand locks
reads the kernel table once and asks about each process once. One row of the
state table in ``docs/diagnostics.md`` is one return of :func:`_verdict`.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grex_locks._core.lock_file import FileKey
from grex_locks._core.owner_record import OWNER_SUFFIX, record_path

from .diagnosis import Diagnosis, Holder, HolderState, finite_seconds
from .kernel_lock_table import KernelLockTable, ProcessFiles
from .process_tree import proc_stat
from .record_reader import RecordRead, RecordStatus, read_record, read_record_at

#: psutil derives start times from the boot time, which the kernel may report a
#: second apart between readers; a reused pid starts much later than that.
_START_TIME_SLACK = 1.0
#: A held lock file with more than one name has its record beside the name its
#: holder used; at most this many directory entries are looked at to find it.
_OTHER_NAMES_SCAN_LIMIT = 4096
#: The lock mode of a table that knows only "held" (``diagnose.diagnose_busy``'s).
MODE_UNKNOWN = "UNKNOWN"


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


@dataclass
class _Verdict:
    state: HolderState
    note: str = ""
    shared: bool = False
    #: The holders when already known; ``None`` means "find them" (if held).
    holder_pids: list[int] | None = None
    #: Who took the lock, when the verdict read the kernel's table itself.
    taker_pids: list[int] | None = None


def _verdict_unseen(record: RecordRead, key: FileKey, probe: Probe) -> _Verdict:
    """Without the kernel's table: held only if the recorded process shows it; else unknown.

    A process's own ``fdinfo`` can show that it holds the lock; nothing short
    of the kernel's table can show that nobody does, so a lock not seen held
    is ``UNREADABLE``, never ``FREE`` nor ``STALE_RECORD``.
    """
    owner = record.owner if record.status is RecordStatus.VALID else None
    reason = probe.table.reason or "the kernel's lock table cannot be read"
    if owner is not None and _holds_per_fdinfo(owner, key, probe):
        pid = owner["pid"]
        return _Verdict(
            HolderState.HELD,
            f"{reason}; pid {pid}'s own descriptors show that it holds the lock",
            holder_pids=[pid],
        )
    note = f"{reason}, so whether the lock is held cannot be seen"
    if owner is not None:
        alive = probe.identity_of(owner) == "alive"
        note += f"; its owner record names pid {owner['pid']}, which " + (
            "is alive but shows no hold here" if alive else "is gone"
        )
    return _Verdict(HolderState.UNREADABLE, note, holder_pids=[])


def _verdict_exclusive(  # noqa: PLR0911 - one return per case
    owner: dict[str, Any], key: FileKey, taker_pids: list[int] | None, probe: Probe
) -> _Verdict:
    """Held exclusively with a valid record: does the recorded process hold it, or did it take it?

    ``taker_pids`` are the pids the kernel says took the lock (``0``: one it
    does not show from this pid namespace); ``None`` when that is not known.
    """
    pid: int = owner["pid"]
    identity = probe.identity_of(owner)
    if identity == "alive":
        holds = probe.files.holds(pid, key)
        if holds:
            return _Verdict(HolderState.HELD, holder_pids=[pid])
        if pid in (taker_pids or ()):
            # The recorded process itself took the lock: it holds it where
            # its descriptors are closed to us, or let go since the table
            # was read (a moment's state: whoever holds it now is looked for).
            return _Verdict(HolderState.HELD, holder_pids=None if holds is False else [pid])
        return _Verdict(HolderState.UNKNOWN_HOLDER)
    if identity == "reused" and probe.files.holds(pid, key):
        # The process that now has the recorded pid holds the lock itself; it
        # is not the process the record describes, whatever the table says.
        return _Verdict(HolderState.UNKNOWN_HOLDER, _reused_note(owner, probe))
    gone = "now belongs to another process" if identity == "reused" else "has exited"
    if taker_pids is None:
        # Whether the holder inherited the lock from pid N, or took it after
        # N was gone (a foreign flock(1) after a crash), cannot be told: say
        # neither.
        return _Verdict(
            HolderState.UNKNOWN_HOLDER,
            f"pid {pid} {gone}; whether it took the lock is not known here",
        )
    # The kernel names the pid that took the lock: if that is the recorded
    # (now dead) process, whoever holds it inherited the descriptor.
    if pid in taker_pids or not any(p > 0 for p in taker_pids):
        return _Verdict(HolderState.ORPHANED, f"pid {pid} {gone}")
    return _Verdict(HolderState.UNKNOWN_HOLDER)


def _reused_note(owner: dict[str, Any], probe: Probe) -> str:
    """Why the live process with the recorded pid is not the one the record names."""
    pid = owner["pid"]
    holder = probe.holder(pid)
    started = holder.create_time if holder is not None else 0.0
    recorded = finite_seconds(owner["create_time"])
    when = f", started at {_clock(started)}" if started else ""
    named = f" (started at {_clock(recorded)})" if recorded is not None else ""
    return (
        f"the process its owner record names{named} is gone, and pid {pid} now belongs to "
        f"another process{when}, which holds the lock itself"
    )


def _clock(seconds: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f} s after the epoch"


def _verdict_busy(
    record: RecordRead, owner: dict[str, Any] | None, key: FileKey, probe: Probe
) -> _Verdict:
    """Judge a lock known only to be held (an acquire was just refused), cheapest evidence first.

    A live recorded process that holds it is the cheap answer. Else the
    kernel's lines about this one file say who took it and how (one read,
    tens of microseconds, where asking every process's ``fdinfo`` costs
    tens of milliseconds on a machine with thousands of processes, and
    sees nothing of other users' processes). Only where that table cannot
    be read are the processes' own ``fdinfo`` asked.
    """
    if owner is not None:
        pid: int = owner["pid"]
        if probe.identity_of(owner) == "alive" and probe.files.holds(pid, key):
            return _Verdict(HolderState.HELD, holder_pids=[pid])
    table = KernelLockTable.read(attempts=1, inode=key[1])
    if table.available:
        return _verdict_by_table(record, owner, key, table, probe)
    readers = probe.readers(key, [])
    if readers:
        return _Verdict(HolderState.HELD, shared=True, holder_pids=readers)
    if owner is None:
        return _verdict_no_record(record)
    return _verdict_exclusive(owner, key, probe.files.takers(key) or None, probe)


def _verdict_by_table(
    record: RecordRead,
    owner: dict[str, Any] | None,
    key: FileKey,
    table: KernelLockTable,
    probe: Probe,
) -> _Verdict:
    """:func:`_verdict_busy`'s judgement once the kernel's lines about the lock were read."""
    granted = table.holders(key)
    takers = [lock.pid for lock in granted]
    if not granted:
        return _Verdict(
            HolderState.UNKNOWN_HOLDER,
            "it was let go before its holder could be seen",
            holder_pids=[],
            taker_pids=[],
        )
    if {lock.mode for lock in granted} == {"READ"}:
        return _Verdict(HolderState.HELD, shared=True, taker_pids=takers)
    verdict = (
        _verdict_no_record(record)
        if owner is None
        else _verdict_exclusive(owner, key, takers, probe)
    )
    return replace(verdict, taker_pids=takers)


def _verdict_no_record(record: RecordRead) -> _Verdict:
    """Held, with no record, or one that cannot be read."""
    no_record = record.status in (RecordStatus.MISSING, RecordStatus.EMPTY)
    why = "" if no_record else f"the owner record is unreadable: {record.problem}"
    return _Verdict(HolderState.UNKNOWN_HOLDER, why)


def _verdict_remote(  # noqa: PLR0911 - one return per case
    owner: dict[str, Any], hostname: str, key: FileKey, probe: Probe
) -> _Verdict:
    """A record written on another host: judged only by who holds the lock *here*.

    A lock nobody here holds cannot be judged from here (its holder, if any,
    is on that host): ``REMOTE``. One that a process here holds can be seen:
    the record names a process that neither holds nor took it here (its pid
    means nothing on this host, and is never looked up).
    """
    remote = _Verdict(HolderState.REMOTE, f"recorded on host {hostname}")
    if not probe.table.available:
        return remote
    granted = probe.table.holders(key)
    modes = {lock.mode for lock in granted}
    if MODE_UNKNOWN in modes:
        # Held, says a refused acquire: by a process here only if one's
        # fdinfo shows the lock (a holder on the other host shows nowhere here).
        local = [o.pid for o in probe.files.openers(key) if o.locked]
        if not local:
            return remote
        if all(probe.files.lock_mode(pid, key) == "READ" for pid in local):
            return _Verdict(HolderState.HELD, shared=True, holder_pids=local)
        return _Verdict(HolderState.UNKNOWN_HOLDER, holder_pids=local)
    if not granted:
        return remote  # free here, or only waited for here: held, if at all, elsewhere
    if modes == {"READ"}:
        return _Verdict(HolderState.HELD, shared=True)
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
    # fdinfo first, right after the record was read: a short hold can end
    # while psutil looks the process up.
    return bool(probe.files.holds(pid, key)) and (probe.identity_of(owner) == "alive")


def remote_host(record: RecordRead, probe: Probe) -> str:
    """The host a valid record names, if that is not this one; else ``""``."""
    owner = record.owner if record.status is RecordStatus.VALID else None
    hostname = owner.get("hostname") if owner is not None else None
    return hostname if isinstance(hostname, str) and hostname != probe.hostname else ""


def _verdict(  # noqa: PLR0911 - one return per row of the state table
    record: RecordRead, key: FileKey, held: bool, probe: Probe
) -> _Verdict:
    owner = record.owner if record.status is RecordStatus.VALID else None
    no_record = record.status in (RecordStatus.MISSING, RecordStatus.EMPTY)
    hostname = remote_host(record, probe)
    if owner is not None and hostname:
        return _verdict_remote(owner, hostname, key, probe)
    if not probe.table.available:
        return _verdict_unseen(record, key, probe)
    if not held:
        if owner is not None and _holds_per_fdinfo(owner, key, probe):
            return _Verdict(HolderState.HELD, holder_pids=[owner["pid"]])
        return _Verdict(HolderState.FREE if no_record else HolderState.STALE_RECORD)
    granted = probe.table.holders(key)
    taker_pids = [lock.pid for lock in granted]
    modes = {lock.mode for lock in granted}
    if granted and modes == {"READ"}:
        return _Verdict(HolderState.HELD, shared=True)
    if MODE_UNKNOWN in modes:
        return _verdict_busy(record, owner, key, probe)
    if owner is None:
        return _verdict_no_record(record)
    return _verdict_exclusive(owner, key, taker_pids, probe)


def _record_of_another_name(path: Path, key: FileKey) -> tuple[RecordRead, Path] | None:
    """A valid record beside another name (hard link) of the lock file ``key`` in its directory.

    Holders write ``<the name they used>.owner``. Only ``path``'s own
    directory is searched, and at most :data:`_OTHER_NAMES_SCAN_LIMIT` of its
    entries: a name in another directory is not found (finding it would
    mean walking the whole file system).
    """
    own = path.name + OWNER_SUFFIX
    try:
        with os.scandir(path.parent) as listing:
            for count, entry in enumerate(listing):
                if count >= _OTHER_NAMES_SCAN_LIMIT:
                    break
                name = entry.name
                if not name.endswith(OWNER_SUFFIX) or name == own:
                    continue
                other = path.parent / name[: -len(OWNER_SUFFIX)]
                try:
                    st = os.lstat(other)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == key:
                    read = read_record_at(record_path(other))
                    if read.status is RecordStatus.VALID:
                        return read, record_path(other)
    except OSError:
        return None
    return None


@dataclass
class _Look:
    """One look at a held or recorded lock: the record, the kernel's lines about it, the verdict."""

    record: RecordRead
    record_at: Path | None
    verdict: _Verdict
    taker_pids: list[int]
    waiter_pids: list[int]
    holder_pids: list[int]
    probe: Probe
    key: FileKey

    def current(self) -> bool:
        """Whether a holder still held the lock after the record was read (or that cannot be told).

        A table read during a short hold and a record read after it see a
        lock held without a record; the holder's own ``fdinfo``, read last,
        says whether that hold is still on.
        """
        holds = self.probe.files.holds
        return not self.holder_pids or any(
            holds(pid, self.key) is not False for pid in self.holder_pids
        )

    def agrees_with(self, other: _Look) -> bool:
        """Whether ``other`` saw the same: verdict, record bytes, takers and holders, still held."""
        return (
            self.current()
            and other.current()
            and self.verdict.state is other.verdict.state
            and self.record.same_as(other.record)
            and self.record_at == other.record_at
            and sorted(self.taker_pids) == sorted(other.taker_pids)
            and sorted(self.holder_pids) == sorted(other.holder_pids)
        )


def _look(path: Path, key: FileKey, record: RecordRead, probe: Probe, links: int) -> _Look:
    """Judge ``record`` against what ``probe`` sees of the lock ``key`` (one look)."""
    waiter_pids = [lock.pid for lock in probe.table.waiters(key)]
    taker_pids = [lock.pid for lock in probe.table.holders(key)]
    held = bool(taker_pids or waiter_pids)
    verdict = _verdict(record, key, held, probe)
    record_at = None
    if held and links > 1 and verdict.state in (HolderState.UNKNOWN_HOLDER, HolderState.ORPHANED):
        found = _record_of_another_name(path, key)
        if found is not None:
            again = _verdict(found[0], key, held, probe)
            if again.state is HolderState.HELD:
                (record, record_at), verdict = found, again
    if verdict.taker_pids is not None:
        taker_pids = verdict.taker_pids
    pids = verdict.holder_pids
    if pids is None:
        pids = probe.files.holders(key, taker_pids, waiter_pids) if held else []
    elif pids:
        pids = probe.files.with_family(key, pids)
    verdict = _reconciled(verdict, record, pids, probe)
    return _Look(record, record_at, verdict, taker_pids, waiter_pids, pids, probe, key)


def _reconciled(verdict: _Verdict, record: RecordRead, pids: list[int], probe: Probe) -> _Verdict:
    """``verdict`` squared with the holders found after it, which a lock changing hands can move.

    A recorded process that let go as the verdict was reached and took the
    lock again before its holders were looked for is the holder the record
    names (``HELD``), not an unknown one; one that was seen taking the lock
    but is not among its holders now is not the holder (``UNKNOWN_HOLDER``).
    A live process with the recorded pid is never the "gone" process a
    lock was inherited from.
    """
    owner = record.owner if record.status is RecordStatus.VALID else None
    if owner is None or verdict.shared or remote_host(record, probe):
        return verdict
    pid, state = owner["pid"], verdict.state
    if pid in pids and state in (HolderState.UNKNOWN_HOLDER, HolderState.ORPHANED):
        if probe.identity_of(owner) == "alive":
            return _Verdict(HolderState.HELD, holder_pids=pids, taker_pids=verdict.taker_pids)
        note = verdict.note if state is HolderState.UNKNOWN_HOLDER else _reused_note(owner, probe)
        return replace(verdict, state=HolderState.UNKNOWN_HOLDER, note=note)
    if state is HolderState.HELD and pids and pid not in pids:
        return replace(verdict, state=HolderState.UNKNOWN_HOLDER)
    return verdict


#: At most this many looks are taken at a lock whose verdict needs confirming.
LOOKS = 5
#: The verdicts a lock changing hands can fake, so they are confirmed by a second look:
#: a record read during a hold and a table read after it "stale"; a table read during
#: a hold and a record read after it (blanked) "unknown".
_TO_CONFIRM = frozenset(
    {HolderState.STALE_RECORD, HolderState.UNKNOWN_HOLDER, HolderState.ORPHANED}
)


#: How many looks in a row must agree that a lock is held without any record.
_NO_RECORD_AGREEING = 4


def _settle(path: Path, key: FileKey, look: _Look, links: int, before: RecordRead | None) -> _Look:
    """Look again until the verdict is confirmed, or :data:`LOOKS` looks were taken.

    ``STALE_RECORD`` stands when the record read before a table that shows
    the lock free is byte for byte the record read after it: a dead holder's
    record never changes, while a live holder blanks its record before each
    release and writes a new one (a new ``acquired_at``) at each hold.
    ``UNKNOWN_HOLDER`` and ``ORPHANED`` stand when two looks (table, then
    record) agree; ``UNKNOWN_HOLDER`` without a record when
    :data:`_NO_RECORD_AGREEING` looks in a row do, since a grex_locks holder
    cycling fast is between holds, its record blank, a good part of the
    time, while a foreign holder's missing record stays missing. ``FREE``
    and ``HELD`` need no confirming: each is true of the moment it was seen.
    ``before`` is the record as read before ``look``'s table, if it was.
    """
    previous: _Look | None = None
    agreeing = 1
    for count in range(1, LOOKS + 1):
        state = look.verdict.state
        if state not in _TO_CONFIRM or not (look.probe.live and look.probe.table.available):
            return look  # true when seen; or judged from the record alone: nothing to confirm
        if state is HolderState.STALE_RECORD:
            if before is not None and before.same_as(look.record):
                return look
        elif previous is not None and previous.agrees_with(look):
            agreeing += 1
            no_record = look.record.status in (RecordStatus.MISSING, RecordStatus.EMPTY)
            if agreeing >= (_NO_RECORD_AGREEING if no_record else 2):
                return look
        else:
            agreeing = 1
        if count == LOOKS:
            break
        previous, before = look, look.record
        probe = look.probe.again(key)  # the table first, then the record
        look = _look(path, key, read_record(path), probe, links)
    return _unconfirmed(path, look)


def _between_records(path: Path, record: RecordRead, pids: list[int], probe: Probe) -> bool:
    """Whether a holder of a lock without a record has that record file open.

    A grex_locks lock keeps a descriptor on its record file, writes the
    record just after the lock is granted and blanks it just before it is
    let go: a holder cycling fast is seen without a record a good part of
    the time. A foreign holder (``flock(1)``) has no record file open.
    """
    if record.status not in (RecordStatus.MISSING, RecordStatus.EMPTY) or not pids:
        return False
    try:
        st = os.stat(record_path(path), follow_symlinks=False)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    return any(key in (probe.files.files_of(pid) or {}) for pid in pids)


def _unconfirmed(path: Path, look: _Look) -> _Look:
    """The last of :data:`LOOKS` looks that never agreed: the lock changed hands during each.

    A stale-looking record that changed between every two looks was being
    written: it is not a dead holder's. When the last one names a live
    process (which did not hold the lock), the lock was free when last
    seen: ``FREE``, without that record (it describes no hold now), never
    ``STALE_RECORD``. Otherwise the last look stands, saying so.
    """
    changing = f"the lock changed hands during each of {LOOKS} looks"
    verdict, record = look.verdict, look.record
    owner = record.owner if record.status is RecordStatus.VALID else None
    if (
        verdict.state is HolderState.STALE_RECORD
        and owner is not None
        and look.probe.identity_of(owner) == "alive"
    ):
        look.verdict = _Verdict(
            HolderState.FREE,
            f"{changing}: its owner record was rewritten each time, last naming pid "
            f"{owner['pid']} (alive), and no process held the lock when last seen",
            holder_pids=[],
        )
        look.record = RecordRead(RecordStatus.EMPTY, uid=record.uid)
        look.holder_pids = []
        return look
    if verdict.state is HolderState.UNKNOWN_HOLDER and _between_records(
        path, record, look.holder_pids, look.probe
    ):
        # Held without a record at every look, but never the same way twice, by
        # a process that keeps this lock's record open: a grex_locks holder
        # taking and letting go faster than a look, caught between its
        # record's writes each time. (A holder whose record stays missing is
        # seen the same way by agreeing looks, and stays UNKNOWN_HOLDER.)
        look.verdict = _Verdict(
            HolderState.HELD,
            f"{changing}: its holder keeps this lock's owner record open and was "
            "caught between taking the lock and recording itself each time",
            holder_pids=look.holder_pids,
            taker_pids=verdict.taker_pids,
        )
        return look
    note = "; ".join(filter(None, (verdict.note, f"{changing}; this is the last")))
    look.verdict = replace(verdict, note=note)
    return look


def judge(
    path: Path,
    key: FileKey | None,
    record: RecordRead,
    probe: Probe,
    *,
    links: int = 1,
    lock_file_type: str = "",
    note: str = "",
    before: RecordRead | None = None,
) -> Diagnosis:
    """Diagnose the lock file ``path`` (identity ``key``, ``None`` if absent) given its record.

    ``links`` is the lock file's link count: with more than one name, a
    record is also looked for beside its other names. ``lock_file_type`` says
    what sits at ``path`` if it is not a regular file. ``before`` is the
    record as read before ``probe``'s table was, if it was: it can confirm
    a ``STALE_RECORD`` without a second look (see :func:`_settle`).
    """
    base: dict[str, Any] = {
        "path": path,
        "kernel_visible": probe.table.available,
        "lock_file_type": lock_file_type,
    }
    if key is None:
        return Diagnosis(
            state=HolderState.FREE,
            note=note or "the lock file does not exist",
            record_file_type=record.file_type,
            diagnosed_at=probe.now,
            **base,
        )
    if (
        record.status is RecordStatus.MISSING
        and probe.table.available
        and key not in probe.table
        and not lock_file_type
    ):
        # The common case, cheap.
        return Diagnosis(state=HolderState.FREE, note=note, diagnosed_at=probe.now, **base)
    look = _settle(path, key, _look(path, key, record, probe, links), links, before)
    record, verdict, seen = look.record, look.verdict, look.probe
    if lock_file_type and verdict.state in (HolderState.FREE, HolderState.STALE_RECORD):
        # Nobody holds it, yet no acquire can take it (LockIOError): never
        # "free", so that `grex-locks who` does not answer "nothing to do".
        verdict = replace(verdict, state=HolderState.UNREADABLE)
    return Diagnosis(
        state=verdict.state,
        owner=record.owner,
        record_problem=record.problem,
        record_file_type=record.file_type,
        record_user=seen.user(record.uid),
        record_at=look.record_at,
        record_host=remote_host(record, seen),
        holders=seen.holders(look.holder_pids),
        waiters=seen.holders(look.waiter_pids),
        lock_pids=tuple(dict.fromkeys(look.taker_pids)),
        shared=verdict.shared,
        note="; ".join(n for n in (note, verdict.note) if n),
        diagnosed_at=seen.now,
        **base,
    )
