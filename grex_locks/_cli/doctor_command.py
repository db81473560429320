"""``grex-locks doctor``: owner records left behind by dead holders, and pruning them.

The one command that may change a file: ``--prune`` removes a stale record
while holding its lock for that moment (see :mod:`grex_locks._diagnostics.prune`).
A removal the system refuses is an error (exit 2), not a silent "kept".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grex_locks._core.owner_record import record_path
from grex_locks._diagnostics.diagnosis import HolderState
from grex_locks._diagnostics.prune import PruneOutcome, prune_stale_record, stale_records

from .display import shell
from .inspect_commands import count, error, report_incomplete, scan_root


def _by_hand(record: Path, file_type: str) -> str:
    if file_type == "directory":
        return f"remove it by hand with {shell('rmdir', record)} (once it is empty)"
    extra = ", not what it points to" if file_type == "symlink" else ""
    return (
        f"remove it by hand with {shell('rm', record)} (that removes the {file_type} itself{extra})"
    )


def _prune_failed(outcome: PruneOutcome) -> bool:
    """Whether a prune was refused by the system, as opposed to kept on purpose.

    A lock held now, or something other than a file at the record path, is
    kept by design; a record that is gone by the time of the removal is no
    failure either (its holder, or another doctor, cleared it).
    """
    return (
        not outcome.removed
        and outcome.reason.startswith("cannot ")
        and os.path.lexists(outcome.record)
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    """List owner records left behind by dead holders; with --prune, remove the verifiably stale.

    Only regular-file records are ever removed; anything else at a record
    path (a directory, a symlink, a FIFO) is listed with what to do by hand.
    """
    # Pruning reaches each record without following a symlink, refusing one
    # met on the way (it may have been swapped in since the scan): so a root
    # given through a symlink of the user's own choosing is resolved first.
    result = scan_root(os.path.realpath(args.root) if args.prune and args.root else args.root)
    stale = stale_records(result)
    blocked = [
        d
        for d in result
        if d.record_file_type == "directory" and d.state is not HolderState.STALE_RECORD
    ]
    failures: list[PruneOutcome] = []
    if not stale and not blocked:
        print(f"no stale owner records under {result.root or args.root}")
    for d in stale:
        record = record_path(d.path)
        if d.record_file_type:
            print(f"stale: {record}: a {d.record_file_type}, not a record")
            print(
                f"  kept: doctor removes only regular-file records; "
                f"{_by_hand(record, d.record_file_type)}"
            )
            continue
        pid = d.owner.get("pid") if d.owner else "?"
        why = f"unreadable ({d.record_problem})" if d.record_problem else f"left by pid {pid}"
        print(f"stale: {record}: {why}")
        if args.prune:
            outcome = prune_stale_record(d)
            verb = "removed" if outcome.removed else "kept"
            print(f"  {verb}: {outcome.reason}")
            if _prune_failed(outcome):
                failures.append(outcome)
    for d in blocked:
        record = record_path(d.path)
        print(f"blocked: {record}: a directory, so holders of {d.path} cannot record themselves")
        print(f"  kept: doctor removes only regular-file records; {_by_hand(record, 'directory')}")
    report_incomplete(result)
    if failures:
        first = failures[0]
        error(
            f"{count(len(failures), 'stale record')} could not be removed; "
            f"first: {first.record}: {first.reason}"
        )
    return 2 if result.unreadable or failures else 0
