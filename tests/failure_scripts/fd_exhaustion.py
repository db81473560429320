"""Scenario: every descriptor in use; each lock operation must fail cleanly with LockIOError.

Usage: ``fd_exhaustion.py ROOT cold|warm``: ``warm`` takes and releases a lock
first, so that the process has written an owner record before the
descriptors run out (what a record needs about the process is then known);
``cold`` does not. Prints one JSON line: the outcome of each
operation, the problems seen (something half-held), how many descriptors the
failures leaked, and whether another process could take the lock afterwards.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grex_locks import LockIOError, PackLock, Scheduler, acquire_all
from grex_locks._core.fair_queue import queues_in_use as registry_size
from grex_locks._core.owner_record import record_path
from grex_locks._core.tiers import held_tiers

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""

TRY = """
import sys
from grex_locks import PackLock
with PackLock(sys.argv[1]).try_acquire():
    print("took it")
"""


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def start_holder(path: Path) -> subprocess.Popen[str]:
    """Another process holding ``path`` until its stdin says otherwise."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def exhaust() -> list[int]:
    """Lower RLIMIT_NOFILE and open /dev/null until no descriptor is left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    return fillers


def main() -> None:  # noqa: PLR0915 - one scenario, read top to bottom
    root, warm = Path(sys.argv[1]), sys.argv[2] == "warm"
    own = PackLock(root / "own")  # opened while descriptors are plenty
    other = PackLock(root / "other")
    contended = PackLock(root / "contended")
    holder = start_holder(contended.path)
    if warm:
        other.acquire().release()
    outcomes: dict[str, str] = {}
    problems: list[str] = []
    baseline = fd_count()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = exhaust()

    def attempt(name: str, operation: Callable[[], Any], locks: list[PackLock]) -> None:
        try:
            result = operation()
        except LockIOError as exc:
            outcomes[name] = "LockIOError"
            if not isinstance(exc.__cause__, OSError):
                problems.append(f"{name}: LockIOError without the OSError as its cause")
        except Exception as exc:  # noqa: BLE001 - the outcome is what is reported
            outcomes[name] = f"{type(exc).__name__}: {exc}"
        else:
            outcomes[name] = "ok"
            result.release()
        if registry_size():
            problems.append(f"{name}: {registry_size()} gate entries left")
        if held_tiers():
            problems.append(f"{name}: tiers {held_tiers()} still held")
        for lock in locks:
            if lock.held:
                problems.append(f"{name}: {lock.path} still held by the failed call")
            record = record_path(lock.path)
            lent = bool(fillers)
            if lent:
                os.close(fillers.pop())  # one descriptor, lent to read the record
            content = record.read_bytes().strip() if record.exists() else b""
            if lent:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            if content:
                problems.append(f"{name}: record content left at {record}")

    attempt("construct", lambda: PackLock(root / "new"), [])
    attempt("scheduler", lambda: Scheduler(2, slots_dir=root / "slots"), [])
    attempt("acquire", own.acquire, [own])
    attempt("try_acquire", own.try_acquire, [own])
    attempt("wait_with_timeout", lambda: contended.acquire(timeout=5), [contended])
    attempt("acquire_all", lambda: acquire_all([own, other], timeout=5), [own, other])

    for fd in fillers:
        os.close(fd)
    fillers.clear()
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    leaked = fd_count() - baseline
    attempt("recovered", lambda: acquire_all([own, other], timeout=5), [own, other])
    took = subprocess.run(
        [sys.executable, "-c", TRY, str(root / "own")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    holder.communicate("\n", timeout=30)
    report = {
        "outcomes": outcomes,
        "problems": problems,
        "fds_leaked": leaked,
        "other_process_took_it": took.stdout.strip() == "took it",
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
