"""The commands that only look: ``who``, ``scan`` and ``doctor``.

None of them takes a lock or changes a file, except ``doctor --prune``
removing an owner record whose lock the kernel shows free at that moment.
A lock or directory that cannot be looked at (permission denied) is shown as
``UNREADABLE`` with the error and path, never as free: ``who`` answers 1 for
it (a state other than free), ``scan`` and ``doctor`` 2 (their answer is
incomplete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from grex_locks._core.owner_record import OWNER_SUFFIX, record_path
from grex_locks._diagnostics.diagnose import inspect, lock_path_of
from grex_locks._diagnostics.diagnosis import Diagnosis, HolderState
from grex_locks._diagnostics.judge import Probe
from grex_locks._diagnostics.lock_names import is_lock_name
from grex_locks._diagnostics.prune import prune_stale_record, stale_records
from grex_locks._diagnostics.scan import ScanResult, diagnose_found, locks_in, scan

PROG = "grex-locks"
_FREE_STATES = (HolderState.FREE, HolderState.STALE_RECORD)


class UserError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


def error(message: str) -> None:
    """Print ``message`` as the command's error line."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def existing(name: str) -> Path:
    """``name`` as a path, or a :class:`UserError` if there is nothing there.

    Only "no such file" is an error here: a path that cannot be looked at
    (permission denied) is left for the diagnosis to report.
    """
    target = Path(name)
    try:
        os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"no such file or directory: {name}") from None
    except OSError:
        pass
    return target


def _print_json(diagnoses: Sequence[Diagnosis]) -> None:
    print(json.dumps([d.to_dict() for d in diagnoses], indent=2, allow_nan=False))


def _status(diagnoses: Sequence[Diagnosis]) -> int:
    """0 if every lock is ``FREE`` or ``STALE_RECORD``, else 1 (held, or not inspectable)."""
    return 0 if all(d.state in _FREE_STATES for d in diagnoses) else 1


# -- who ----------------------------------------------------------------------


def _who_one(name: str, probe: Probe) -> tuple[list[Diagnosis], str]:
    """The diagnoses ``name`` asks for, and a remark when it names a directory without locks."""
    target = existing(name).absolute()
    if target.name.endswith(OWNER_SUFFIX) and target.name != OWNER_SUFFIX:
        target = target.with_name(target.name[: -len(OWNER_SUFFIX)])
    elif os.path.isdir(target) and not is_lock_name(target.name):
        found, _ = locks_in(target)
        if not found:
            return [], f"{target}: no grex lock files in this directory"
        diagnoses = [diagnose_found(f, probe) for f in found]
        return sorted(diagnoses, key=lambda d: str(d.path)), ""
    return [inspect(lock_path_of(target), probe)], ""


def cmd_who(args: argparse.Namespace) -> int:
    """Diagnose each lock (a directory: every grex lock in it); 1 if any is held."""
    diagnoses: list[Diagnosis] = []
    remarks: list[str] = []
    failed = False
    probe = Probe()
    for name in args.locks:
        try:
            found, remark = _who_one(name, probe)
        except UserError as exc:
            error(str(exc))
            failed = True
            continue
        diagnoses += found
        if remark:
            remarks.append(remark)
            if not args.json:
                print(remark)
    if args.json:
        _print_json(diagnoses)
        for remark in remarks:
            print(f"{PROG}: {remark}", file=sys.stderr)
    else:
        for d in diagnoses:
            print(f"{d.path}: {d.state.name}")
            print(
                textwrap.fill(
                    d.explain(),
                    width=100,
                    initial_indent="  ",
                    subsequent_indent="  ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return 2 if failed else _status(diagnoses)


# -- scan -----------------------------------------------------------------------


def needs_attention(d: Diagnosis) -> bool:
    """Whether ``scan`` shows ``d`` by default: anything but a free, usable lock."""
    return d.state is not HolderState.FREE or bool(d.lock_file_type or d.record_file_type)


def _remark(d: Diagnosis) -> str:
    if d.state is HolderState.UNREADABLE:
        return d.note
    if d.lock_file_type:
        return f"a {d.lock_file_type} at the lock path: every acquire fails"
    if d.record_file_type:
        return f"a {d.record_file_type} at the owner record path"
    if d.record_at is not None:
        return f"recorded at {d.record_at}"
    return ""


def _row(d: Diagnosis, root: Path) -> list[str]:
    if d.holders:
        pids = ",".join(str(h.pid) for h in d.holders)
    elif d.owner is not None and d.state is not HolderState.FREE:
        pids = str(d.owner.get("pid", "-"))
    else:
        pids = "-"
    age = d.held_for()
    command = d.holders[0].command() if d.holders else d.recorded_command()
    shown, prefix = str(d.path), f"{root}{os.sep}"
    if shown.startswith(prefix):
        shown = shown[len(prefix) :]
    remark = _remark(d)
    return [
        d.state.name,
        pids,
        "-" if age is None else f"{age:.1f}s",
        str(len(d.waiters)) if d.waiters else "-",
        command or "-",
        f"{shown}  [{remark}]" if remark else shown,
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def scan_root(root: str) -> ScanResult:
    """``scan(root)``, with a bad ROOT as a :class:`UserError`."""
    try:
        return scan(existing(root))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(str(exc)) from None


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def summary_line(result: ScanResult, shown: int) -> str:
    """``"10003 locks under /ws: 3 HELD, 10000 FREE (10000 not shown; --all lists them)"``."""
    counts = Counter(d.state for d in result)
    tally = ", ".join(f"{counts[state]} {state.name}" for state in HolderState if counts[state])
    unreadable = len(result.unreadable)
    found = _count(len(result) - unreadable, "lock") + (
        f" and {_count(unreadable, 'unreadable path')}" if unreadable else ""
    )
    text = f"{found} under {result.root}" + (f": {tally}" if tally else "")
    hidden = len(result) - shown
    if hidden:
        text += f" ({hidden} free, not shown; --all lists every lock)"
    return text


def _incomplete(result: ScanResult) -> None:
    unreadable = result.unreadable
    if unreadable:
        print(
            f"{PROG}: {len(unreadable)} path(s) could not be read, so the answer is "
            f"incomplete; first: {unreadable[0].note}",
            file=sys.stderr,
        )


def cmd_scan(args: argparse.Namespace) -> int:
    """Print the grex locks under ROOT that need attention (or all, or JSON), then any cycles."""
    result = scan_root(args.root)
    root = result.root or Path(args.root)
    if args.json:
        _print_json(result)
    else:
        shown = [d for d in result if args.all or needs_attention(d)]
        if shown:
            header = ["STATE", "PID", "AGE", "WAITING", "COMMAND", "LOCK"]
            print(_table([header, *(_row(d, root) for d in shown)]))
        print(summary_line(result, len(shown)))
    stream = sys.stderr if args.json else sys.stdout
    for cycle in result.cycles:
        print(f"wait-for cycle (deadlock): {cycle.describe()}", file=stream)
    if not result.kernel_visible:
        print(
            f"{PROG}: note: the kernel's lock table is unavailable; states come from "
            "owner records alone",
            file=sys.stderr,
        )
    _incomplete(result)
    return 2 if result.unreadable else 0


# -- doctor ---------------------------------------------------------------------


def _by_hand(record: Path, file_type: str) -> str:
    if file_type == "directory":
        return f"remove it by hand with `rmdir {record}` (once it is empty)"
    extra = ", not what it points to" if file_type == "symlink" else ""
    return f"remove it by hand with `rm {record}` (that removes the {file_type} itself{extra})"


def cmd_doctor(args: argparse.Namespace) -> int:
    """List owner records left behind by dead holders; with --prune, remove the verifiably stale.

    Only regular-file records are ever removed; anything else at a record
    path (a directory, a symlink, a FIFO) is listed with what to do by hand.
    """
    result = scan_root(args.root)
    stale = stale_records(result)
    blocked = [
        d
        for d in result
        if d.record_file_type == "directory" and d.state is not HolderState.STALE_RECORD
    ]
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
    for d in blocked:
        record = record_path(d.path)
        print(f"blocked: {record}: a directory, so holders of {d.path} cannot record themselves")
        print(f"  kept: doctor removes only regular-file records; {_by_hand(record, 'directory')}")
    _incomplete(result)
    return 2 if result.unreadable else 0
