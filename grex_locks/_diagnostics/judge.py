"""Judging one lock: the kernel's lock table, checked against the owner record.

:func:`judge` is what ``diagnose``, ``scan`` and the errors an acquire
raises share, given a :class:`~.probe.Probe` that caches what one inspection
learns. The work below it is layered, each module using only those before
it: :mod:`.probe` (what the system shows), :mod:`.verdicts` (the rules of the
state table in ``docs/diagnostics.md``), :mod:`.looks` (the repeated looks
that confirm a verdict while the lock changes hands). This module is the
entry point: the cheap answers, then the settled look as a
:class:`~.diagnosis.Diagnosis`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from grex_locks._core.lock_file import FileKey

from .diagnosis import Diagnosis, HolderState
from .looks import _look, _settle
from .probe import Probe
from .record_reader import RecordRead, RecordStatus
from .verdicts import remote_host


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
    a ``STALE_RECORD`` without a second look (see :func:`.looks._settle`).
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
