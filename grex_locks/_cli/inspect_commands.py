"""The commands that only look: ``who`` and ``scan`` (``doctor`` is beside them).

Neither takes a lock or changes a file.
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from grex_locks._core.owner_record import OWNER_SUFFIX
from grex_locks._diagnostics.diagnose import inspect, lock_path_of
from grex_locks._diagnostics.diagnosis import Diagnosis, HolderState
from grex_locks._diagnostics.lock_names import is_lock_name
from grex_locks._diagnostics.probe import Probe
from grex_locks._diagnostics.scan import ScanResult, diagnose_found, locks_in, scan

from .display import COMMAND_CELLS, command_line, cut, paragraph, shell, table

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
    if not name:
        # Path("") is ".": an empty argument (an unset shell variable) must
        # not quietly mean the current directory.
        raise UserError("an empty path names nothing (an unset variable?)")
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
    is_dir = os.path.isdir(target)
    # Only a file can be a record: a directory named X.owner is most likely a
    # pack (say ``team.owner``), and looking at X instead would miss its lock.
    if target.name.endswith(OWNER_SUFFIX) and target.name != OWNER_SUFFIX and not is_dir:
        target = target.with_name(target.name[: -len(OWNER_SUFFIX)])
    elif is_dir and not is_lock_name(target.name):
        found, _ = locks_in(target)
        if not found:
            return [], f"{target}: no grex lock files in this directory{_blocking(target)}"
        diagnoses = [diagnose_found(f, probe) for f in found]
        return sorted(diagnoses, key=lambda d: str(d.path)), ""
    return [inspect(lock_path_of(target), probe)], ""


def _blocking(directory: Path) -> str:
    """A pointer to the lock whose record path ``directory`` blocks, if it is one."""
    name = directory.name
    if not name.endswith(OWNER_SUFFIX) or name == OWNER_SUFFIX:
        return ""
    lock = directory.with_name(name[: -len(OWNER_SUFFIX)])
    if not os.path.isfile(lock):
        return ""
    return f"; it sits at the owner record path of {lock}: {shell('grex-locks', 'who', lock)}"


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
            print(paragraph(d.explain()))
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
    if d.holders:
        command = command_line(d.holders[0].cmdline) or d.holders[0].command()
    else:
        command = command_line(d.owner.get("argv") if isinstance(d.owner, dict) else None)
    shown, prefix = str(d.path), f"{root}{os.sep}"
    if shown.startswith(prefix):
        shown = shown[len(prefix) :]
    remark = _remark(d)
    return [
        d.state.name,
        pids,
        "-" if age is None else f"{age:.1f}s",
        str(len(d.waiters)) if d.waiters else "-",
        cut(command, COMMAND_CELLS) or "-",
        f"{shown}  [{remark}]" if remark else shown,
    ]


def scan_root(root: str) -> ScanResult:
    """``scan(root)``, with a bad ROOT as a :class:`UserError`."""
    try:
        return scan(existing(root))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(str(exc)) from None


def count(n: int, what: str) -> str:
    """``"1 lock"``, ``"2 locks"``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def summary_line(result: ScanResult, shown: int) -> str:
    """``"10003 locks under /ws: 3 HELD, 10000 FREE (10000 not shown; --all lists them)"``."""
    counts = Counter(d.state for d in result)
    tally = ", ".join(f"{counts[state]} {state.name}" for state in HolderState if counts[state])
    unreadable = len(result.unreadable)
    found = count(len(result) - unreadable, "lock") + (
        f" and {count(unreadable, 'unreadable path')}" if unreadable else ""
    )
    text = f"{found} under {result.root}" + (f": {tally}" if tally else "")
    hidden = len(result) - shown
    if hidden:
        text += f" ({hidden} free, not shown; --all lists every lock)"
    return text


def report_incomplete(result: ScanResult) -> None:
    """Say on stderr which paths are listed as UNREADABLE, if any are (the exit status is 2)."""
    unreadable = result.unreadable
    if unreadable:
        # Not only "could not be read": a FIFO or a directory at a lock path
        # was read well enough to know no lock can be taken there.
        print(
            f"{PROG}: {len(unreadable)} path(s) listed as UNREADABLE: they could not be read, "
            f"or no usable lock file sits there; first: {unreadable[0].note}",
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
            print(table([header, *(_row(d, root) for d in shown)]))
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
    report_incomplete(result)
    return 2 if result.unreadable else 0
