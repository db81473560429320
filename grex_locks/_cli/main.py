"""``grex-locks``: who holds a grex lock, which records are stale, and running a command under one.

Exit codes follow ``API.md``: ``who`` answers 0 when every lock is free (or
only a stale record is left), 1 when any is held, 2 on a usage error or a
missing path; ``run`` passes on its command's status. User errors print one
line on stderr, never a traceback. Logging stays off unless ``-v`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from grex_locks._core.owner_record import record_path
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import Diagnosis, HolderState
from grex_locks._diagnostics.scan import ScanResult, prune_stale_record, scan, stale_records
from grex_locks.errors import LockBusy, LockError, LockTimeout
from grex_locks.locks import PACK_LOCK_FILE_NAME, PackLock

from .run_command import run_holding

PROG = "grex-locks"
_FREE_STATES = (HolderState.FREE, HolderState.STALE_RECORD)


class UserError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _existing(path: str) -> Path:
    target = Path(path)
    if not os.path.lexists(target):
        raise UserError(f"no such file or directory: {path}")
    return target


def _print_json(diagnoses: Sequence[Diagnosis]) -> None:
    print(json.dumps([d.to_dict() for d in diagnoses], indent=2, allow_nan=False))


# -- who ----------------------------------------------------------------------


def cmd_who(args: argparse.Namespace) -> int:
    """Diagnose each lock (a directory means its pack lock); 1 if any is held."""
    diagnoses: list[Diagnosis] = []
    failed = False
    for name in args.locks:
        try:
            target = _existing(name)
        except UserError as exc:
            _error(str(exc))
            failed = True
            continue
        diagnoses.append(diagnose(target / PACK_LOCK_FILE_NAME if target.is_dir() else target))
    if args.json:
        _print_json(diagnoses)
    else:
        for d in diagnoses:
            # explain() ends with "N waiting behind pid X" when anyone waits.
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
    if failed:
        return 2
    return 0 if all(d.state in _FREE_STATES for d in diagnoses) else 1


# -- scan -----------------------------------------------------------------------


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
    waiting = str(len(d.waiters)) if d.waiters else "-"
    return [
        d.state.name,
        pids,
        "-" if age is None else f"{age:.1f}s",
        waiting,
        command or "-",
        shown,
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def _scan(root: str) -> ScanResult:
    try:
        return scan(_existing(root))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(str(exc)) from None


def cmd_scan(args: argparse.Namespace) -> int:
    """Print every grex lock under ROOT (a table, or JSON), then any wait-for cycles."""
    result = _scan(args.root)
    root = result.root or Path(args.root)
    if args.json:
        _print_json(result)
    else:
        header = ["STATE", "PID", "AGE", "WAITING", "COMMAND", "LOCK"]
        print(_table([header, *(_row(d, root) for d in result)]))
        counts: dict[str, int] = {}
        for d in result:
            counts[d.state.name] = counts.get(d.state.name, 0) + 1
        tally = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"{len(result)} locks under {root}" + (f": {tally}" if tally else ""))
    stream = sys.stderr if args.json else sys.stdout
    for cycle in result.cycles:
        print(f"wait-for cycle (deadlock): {cycle.describe()}", file=stream)
    if not result.kernel_visible:
        print(
            f"{PROG}: note: the kernel's lock table is unavailable; states come from "
            "owner records alone",
            file=sys.stderr,
        )
    return 0


# -- doctor ---------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    """List owner records left behind by dead holders; with --prune, remove the verifiably stale."""
    result = _scan(args.root)
    stale = stale_records(result)
    if not stale:
        print(f"no stale owner records under {result.root or args.root}")
    for d in stale:
        pid = d.owner.get("pid") if d.owner else "?"
        why = f"unreadable ({d.record_problem})" if d.record_problem else f"left by pid {pid}"
        print(f"stale: {record_path(d.path)}: {why}")
        if args.prune:
            outcome = prune_stale_record(d)
            verb = "removed" if outcome.removed else "kept"
            print(f"  {verb}: {outcome.reason}")
    return 0


# -- run ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Hold PACK's lock while CMD runs; CMD's status, 1 if the lock was not obtained."""
    command = list(args.cmd)
    if not command:
        raise UserError("run needs a command after --")
    pack = _existing(args.pack)
    lock = PackLock(pack)
    try:
        if args.no_wait:
            lock.try_acquire()
        else:
            lock.acquire(timeout=args.timeout)
    except (LockBusy, LockTimeout) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        return run_holding(command, lock._held_descriptor())
    finally:
        lock.release()


# -- parser ---------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``grex-locks`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect grex locks (who holds them, which records are stale) "
        "and run a command under a pack lock.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr (loguru)")
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    who = commands.add_parser(
        "who",
        help="diagnose locks: who holds them, since when, is it safe to wait",
        description="Diagnose each lock (a directory means its .grex-lock). "
        "Exit 0 if all are free or only stale, 1 if any is held, 2 on error.",
    )
    who.add_argument("locks", nargs="+", metavar="LOCK_OR_PACK", help="lock file or pack dir")
    who.add_argument("--json", action="store_true", help="print a JSON array of diagnoses")
    who.set_defaults(handler=cmd_who)

    scan_cmd = commands.add_parser(
        "scan",
        help="diagnose every grex lock under a directory",
        description="Diagnose every grex lock under ROOT and report wait-for cycles.",
    )
    scan_cmd.add_argument("root", metavar="ROOT", help="directory to search")
    scan_cmd.add_argument("--json", action="store_true", help="print a JSON array of diagnoses")
    scan_cmd.set_defaults(handler=cmd_scan)

    doctor = commands.add_parser(
        "doctor",
        help="list owner records left behind by dead holders",
        description="List stale owner records under ROOT. With --prune, remove each one "
        "whose lock the kernel shows free at that moment; lock files are never touched.",
    )
    doctor.add_argument("root", metavar="ROOT", help="directory to search")
    doctor.add_argument("--prune", action="store_true", help="remove verifiably stale records")
    doctor.set_defaults(handler=cmd_doctor)

    run = commands.add_parser(
        "run",
        usage="%(prog)s [-h] [--timeout S | --no-wait] PACK -- CMD [ARG ...]",
        help="run a command while holding a pack lock",
        description="Hold PACK's lock while CMD runs. CMD inherits the lock, so it stays "
        "covered even if grex-locks is killed; SIGINT and SIGTERM are passed on to CMD. "
        "Exit with CMD's status, 1 if the lock was not obtained, 127 if CMD is not "
        "found, 128+N if CMD died of signal N.",
    )
    run.add_argument("pack", metavar="PACK", help="pack directory whose .grex-lock to hold")
    wait = run.add_mutually_exclusive_group()
    wait.add_argument("--timeout", type=_seconds, metavar="S", help="give up after S seconds")
    wait.add_argument("--no-wait", action="store_true", help="fail at once if the lock is held")
    # Everything after "--" is the command's, options included (argparse's rule).
    run.add_argument("cmd", nargs="*", metavar="CMD", help="the command, after --")
    run.set_defaults(handler=cmd_run)
    return parser


def _configure_logging(verbose: bool) -> None:
    if verbose:
        logger.remove()
        logger.add(sys.stderr, level="DEBUG", format="{time:HH:mm:ss.SSS} {level} {message}")
        logger.enable("grex_locks")
    else:
        logger.disable("grex_locks")


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut ``run``'s command off at the first ``--``: none of it is ours to parse.

    (argparse would hand the command to no one when options follow PACK.)
    """
    for index, word in enumerate(argv):
        if not word.startswith("-"):
            if word == "run" and "--" in argv[index:]:
                cut = argv.index("--", index)
                return argv[:cut], argv[cut + 1 :]
            break
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grex-locks`` with ``argv`` (default: the process's); return the exit status."""
    parser = build_parser()
    words, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(words)
        if command is not None:
            if args.cmd:
                parser.error(f"put the whole command after --, not {args.cmd[0]!r} before it")
            args.cmd = command
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose)
    try:
        status: int = args.handler(args)
        sys.stdout.flush()
    except UserError as exc:
        _error(str(exc))
        return 2
    except LockError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status
