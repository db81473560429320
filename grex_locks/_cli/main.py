"""``grex-locks``: who holds a grex lock, which records are stale, and running a command under one.

Exit codes follow ``docs/cli.md``: ``who`` answers 0 when every lock is free (or
only a stale record is left), 1 when any is in another state (held, or
``UNREADABLE``), 2 on a usage error or a missing path; ``scan`` and
``doctor`` 0, or 2 on error (a missing ROOT, parts that could not be
read, or a stale record ``--prune`` could not remove); ``run`` passes on
its command's status. User errors print one line on stderr, never a
traceback. Logging stays off unless ``-v`` is given (before
or after the command).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from loguru import logger

from grex_locks._version import __version__
from grex_locks.errors import LockBusy, LockError, LockTimeout
from grex_locks.locks import PackLock

from .doctor_command import cmd_doctor
from .inspect_commands import PROG, UserError, cmd_scan, cmd_who, error, existing
from .run_command import EndedByTerminal, die_of, run_holding

# -- run ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Hold PACK's lock while CMD runs; CMD's status, 1 if the lock was not obtained.

    A lock that cannot be taken for an I/O reason (``LockIOError``: a
    directory or FIFO at the lock path, permission denied) is exit 2, as any
    other error.
    """
    command = list(args.cmd)
    if not command:
        raise UserError("run needs a command after --")
    pack = existing(args.pack)
    lock = PackLock(pack)
    try:
        if args.no_wait:
            lock.try_acquire()
        else:
            lock.acquire(timeout=args.timeout)
    except (LockBusy, LockTimeout) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    ended_by: int | None = None
    try:
        status = run_holding(command, lock._held_descriptor())
    except EndedByTerminal as ended:
        ended_by, status = ended.signum, 128 + ended.signum
    finally:
        lock.release()
    if ended_by is not None:
        return die_of(ended_by)  # after the release: the record is cleared first
    return status


# -- parser ---------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def _verbosity(default: object) -> argparse.ArgumentParser:
    # -v is accepted before and after the command: the sub-command's copy
    # leaves the value alone unless given (SUPPRESS), so neither undoes the other.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log to stderr (loguru)"
    )
    return parent


_RUN_HELP = (
    "Hold PACK's lock while CMD runs. CMD inherits the lock, so it stays covered even if "
    "grex-locks is killed; SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to CMD. Exit "
    "with CMD's status; 1 if the lock was not obtained (held: --no-wait, or --timeout ran "
    "out); 2 if it could not be taken for an I/O reason (LockIOError: permission denied, a "
    "directory or FIFO at the lock path), for a missing PACK, or a usage error; 126 if CMD "
    "cannot be executed; 127 if CMD is not found; 128+N if CMD died of signal N."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``grex-locks`` argument parser."""
    verbose = [_verbosity(argparse.SUPPRESS)]
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect grex locks (who holds them, which records are stale) "
        "and run a command under a pack lock.",
        parents=[_verbosity(False)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=verbose, help=summary, description=description)

    who = command(
        "who",
        "diagnose locks: who holds them, since when, is it safe to wait",
        "Diagnose each PATH: a lock file; an owner record X.owner (lock X; a directory "
        "named X.owner is a directory); a directory (every grex lock file directly in it: "
        ".grex-lock, .grex.sync.lock, .grex.lock, *.grex-backend.lock, slot-<n>.lock, "
        "any file with a .owner beside it). "
        "Exit 0 if all are free or only stale, 1 if any is in another state (held, or "
        "UNREADABLE: permission denied), 2 on error (no such path).",
    )
    who.add_argument("locks", nargs="+", metavar="PATH", help="lock file, record or directory")
    who.add_argument("--json", action="store_true", help="print a JSON array of diagnoses")
    who.set_defaults(handler=cmd_who)

    for name, summary, description, flag, flag_help, handler in (
        (
            "scan",
            "diagnose every grex lock under a directory",
            "Diagnose every grex lock under ROOT. The table shows what needs attention "
            "(every state but FREE, and what could not be read), then a line of counts; "
            "wait-for cycles follow. Exit 0, or 2 on error (ROOT missing, or parts of it "
            "could not be read: they are listed as UNREADABLE).",
            "--all",
            "list every lock, free ones too",
            cmd_scan,
        ),
        (
            "doctor",
            "list owner records left behind by dead holders",
            "List stale owner records under ROOT. With --prune, remove each one that is a "
            "regular file and whose lock the kernel shows free at that moment; anything "
            "else at a record path is listed with what to do by hand. Lock files are never "
            "touched. Exit 0, or 2 on error (ROOT missing, parts of it unreadable, or a "
            "stale record that could not be removed).",
            "--prune",
            "remove verifiably stale records",
            cmd_doctor,
        ),
    ):
        walker = command(name, summary, description)
        walker.add_argument("root", metavar="ROOT", help="directory to search")
        walker.add_argument(flag, action="store_true", help=flag_help)
        if name == "scan":
            walker.add_argument(
                "--json", action="store_true", help="print a JSON array of every diagnosis"
            )
        walker.set_defaults(handler=handler)

    run = commands.add_parser(
        "run",
        parents=verbose,
        usage="%(prog)s [-h] [-v] [--timeout S | --no-wait] PACK -- CMD [ARG ...]",
        help="run a command while holding a pack lock",
        description=_RUN_HELP,
    )
    run.add_argument("pack", metavar="PACK", help="pack directory whose .grex-lock to hold")
    wait = run.add_mutually_exclusive_group()
    wait.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="give up after S seconds (inf: wait as long as it takes)",
    )
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
        if sys.stdout is not None:  # None when started with stdout closed (run CMD >&-)
            sys.stdout.flush()
    except (UserError, LockError) as exc:
        error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status
