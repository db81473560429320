"""Scenario: the owner record cannot be written (disk full, or file system read-only).

The record is information, never authority: the lock must be taken all the
same, released cleanly, and leave no record content behind that was not
there before.

Usage (as root, in a private mount namespace: ``unshare -m --propagation
private``): ``record_refused.py ROOT no_space|read_only none|empty|stale``.
Mounts a tiny tmpfs under ROOT, makes a pack lock there, leaves the record
path as asked (no file, the empty file a previous holder leaves, or a stale
record of a dead holder), then fills or remounts read-only the file system
and tries to take the lock. Prints one JSON line: each attempt's outcome,
problems seen in this process, whether another process could take the lock
right after, what was left at the record path, and any temporary files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from grex_locks import LockIOError, PackLock
from grex_locks._core.fair_queue import queues_in_use as registry_size
from grex_locks._core.owner_record import record_path
from grex_locks._core.tiers import held_tiers

STALE = b'{"pid": 999999, "create_time": 1.0, "hostname": "x", "thread": "t", "tier": 2}'

#: Another process takes the lock with a bare flock: it needs no write access.
TAKE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("took it")
"""


def fill(directory: Path) -> None:
    """Use up every byte of the file system holding ``directory``."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"x" * 4096
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    try:
        while True:
            os.write(fd, b"x")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def record_state(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    if not data.strip():
        return "empty"  # blanked in place, or never written
    return "stale" if data == STALE else f"other: {data[:100]!r}"


def main() -> None:
    root, failure, record_before = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    mnt = root / "mnt"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64", "tmpfs", str(mnt)], check=True
    )
    if record_before == "empty":
        # A previous holder leaves the blanked record file. (Its lock object,
        # which keeps the record open for writing, is gone: a file open for
        # writing would make the remount to read-only fail as busy.)
        PackLock(mnt / "pack").acquire().release()
    lock = PackLock(mnt / "pack")
    record = record_path(lock.path)
    if record_before == "stale":
        record.write_bytes(STALE)
    if failure == "no_space":
        fill(mnt)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    report: dict[str, object] = {"record_before": record_state(record)}
    problems: list[str] = []
    for name, attempt in (("acquire", lock.acquire), ("try_acquire", lock.try_acquire)):
        try:
            attempt().release()
            report[name] = "ok"
        except LockIOError as exc:
            report[name] = "LockIOError"
            if not isinstance(exc.__cause__, OSError):
                problems.append(f"{name}: LockIOError without the OSError as its cause")
        except Exception as exc:  # noqa: BLE001 - the outcome is what is reported
            report[name] = f"{type(exc).__name__}: {exc}"
        if lock.held or registry_size() or held_tiers():
            problems.append(
                f"{name}: left held={lock.held} gates={registry_size()} tiers={held_tiers()}"
            )
        taken = subprocess.run(
            [sys.executable, "-c", TAKE, str(lock.path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        report["other_process_took_it"] = taken.stdout.strip() == "took it"
        if not report["other_process_took_it"]:
            problems.append(f"{name}: another process could not take the lock: {taken.stdout!r}")
    # And this process can still take it itself once the pressure is gone.
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        problems.append("the lock is still held by this process")
    finally:
        os.close(fd)
    report["record_after"] = record_state(record)
    report["temporary_files"] = sorted(
        p.name for p in lock.path.parent.iterdir() if ".tmp" in p.name
    )
    report["problems"] = problems
    print(json.dumps(report))


if __name__ == "__main__":
    main()
