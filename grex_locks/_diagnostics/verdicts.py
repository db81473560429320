"""The state table's rules: one look's owner record and kernel lines, turned into a verdict.

One row of the state table in ``docs/diagnostics.md`` is one return of
:func:`_verdict`. A verdict says what one moment showed (asking the
:class:`~.probe.Probe` for anything it needs); whether that moment can be
trusted while the lock changes hands is for :mod:`.looks` to settle, which is
why the rules live apart from the looks that call them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from grex_locks._core.lock_file import FileKey

from .diagnosis import HolderState, finite_seconds
from .kernel_lock_table import KernelLockTable
from .probe import Probe
from .record_reader import RecordRead, RecordStatus

#: The lock mode of a table that knows only "held" (``diagnose.diagnose_busy``'s).
MODE_UNKNOWN = "UNKNOWN"


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
