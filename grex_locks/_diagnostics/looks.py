"""Looking at a lock, and looking again until its verdict is confirmed.

A lock changing hands between reading the kernel's table and reading the
owner record can fake a verdict (a "stale" record, an "unknown" holder).
:func:`_look` takes one look (the table, the record, the verdict of
:mod:`.verdicts`, the holders found after it); :func:`_settle` looks again
until the verdict is confirmed, and :func:`_unconfirmed` says what the last
of :data:`LOOKS` looks that never agreed stands for. They are kept apart
from the rules, which judge one moment, and from :func:`.judge.judge`, which
only turns the settled look into a :class:`~.diagnosis.Diagnosis`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from grex_locks._core.lock_file import FileKey
from grex_locks._core.owner_record import OWNER_SUFFIX, record_path

from .diagnosis import HolderState
from .probe import Probe
from .record_reader import RecordRead, RecordStatus, read_record, read_record_at
from .verdicts import _reused_note, _Verdict, _verdict, remote_host

#: A held lock file with more than one name has its record beside the name its
#: holder used; at most this many directory entries are looked at to find it.
_OTHER_NAMES_SCAN_LIMIT = 4096


def _record_of_another_name(
    path: Path, key: FileKey, opened_as: list[Path]
) -> tuple[RecordRead, Path] | None:
    """A valid record beside another name (hard link) of the lock file ``key``.

    Holders write ``<the name they used>.owner``. The names the holders
    opened the file by (``opened_as``, from /proc) are tried first, then
    ``path``'s own directory, at most :data:`_OTHER_NAMES_SCAN_LIMIT` of its
    entries: a name elsewhere that no holder's /proc shows is not found
    (finding it would mean walking the whole file system).
    """
    for other in opened_as:
        found = _valid_record_beside(other, key) if other != path else None
        if found is not None:
            return found
    own = path.name + OWNER_SUFFIX
    try:
        with os.scandir(path.parent) as listing:
            for count, entry in enumerate(listing):
                if count >= _OTHER_NAMES_SCAN_LIMIT:
                    break
                name = entry.name
                if not name.endswith(OWNER_SUFFIX) or name == own:
                    continue
                found = _valid_record_beside(path.parent / name[: -len(OWNER_SUFFIX)], key)
                if found is not None:
                    return found
    except OSError:
        return None
    return None


def _valid_record_beside(other: Path, key: FileKey) -> tuple[RecordRead, Path] | None:
    """The valid record beside ``other``, if ``other`` is a name of the lock file ``key`` now."""
    try:
        st = os.lstat(other)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key:
        return None
    read = read_record_at(record_path(other))
    return (read, record_path(other)) if read.status is RecordStatus.VALID else None


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
        opened_as = [
            name
            for pid in probe.files.holders(key, taker_pids, waiter_pids)
            for name in probe.files.names(pid, key)
        ]
        found = _record_of_another_name(path, key, opened_as)
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
