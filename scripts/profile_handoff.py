"""Where a hand-off's time goes, step by step, in the process that receives the lock.

    python scripts/profile_handoff.py [--trials N] [--idle MS] [--dir DIR]

The bench's handoff scenario times a hand-off from outside: from just before
the holder's ``release()`` to just after the waiter's ``acquire()`` returned.
This script opens the waiter up. In the waiting process only, it wraps the
calls that mark each step — the kernel's grant, seen by the thread blocked in
``flock`` (the caller, or with ``timeout=`` / ``cancel=`` armed the helper
thread); the caller running again; the owner record's write, begun and done;
``acquire()`` returned — and prints when each happened, counted from the
holder's ``release()``. Two references run in the same run, each trial
rotating through the kinds of waiter: a bare ``fcntl.flock`` waiter, and one
that then writes a minimal owner record by hand (``fstat`` the record file,
stamp the time, finish a CRC, store into a mapped page) — the least any lock
that records its owner must do after the grant.

Then it times the same steps *warm*: in an uncontended loop, where the code
has just run. The difference is what a wake-up costs on this machine: after
sleeping in the kernel, the waiter runs on cold caches, and every step it
takes after the grant costs several times its warm figure. Raw flock's waiter
takes no step after its grant; a lock with an owner record has to write it.

A profiling tool, not a benchmark: each mark costs about 0.3 µs, and the
figures move with the machine's phase, so compare columns of one run only.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

KINDS = ("raw flock", "raw + record", "PackLock", "timeout armed", "cancel armed")
STEPS = (
    ("grant", "kernel grant seen by the thread blocked in flock"),
    ("running", "caller running again (armed: woken by the helper)"),
    ("write_begins", "owner record write begins"),
    ("write_done", "owner record written"),
    ("returned", "acquire() returned"),
)
#: Seconds any one reply may take before the profile gives up.
DEADLINE = 30.0


def _instrument(marks: dict[str, float]) -> None:
    """Wrap the library's step boundaries so that each stamps ``marks`` (in this process only)."""
    from grex_locks._core import kernel_wait, os_lock, owner_record

    lock_blocking = os_lock.lock_blocking
    write = owner_record.RecordFile.write
    granted = kernel_wait.KernelWait.granted
    now = time.monotonic

    def marked_lock_blocking(fd: int, path: Path, *, shared: bool) -> None:
        lock_blocking(fd, path, shared=shared)
        marks["grant"] = now()

    def marked_write(self: owner_record.RecordFile, tier: int, waiter: object = None) -> None:
        marks["write_begins"] = now()
        write(self, tier, waiter)
        marks["write_done"] = now()

    def marked_granted(self: kernel_wait.KernelWait) -> bool:
        marks["running"] = now()
        return granted(self)

    os_lock.lock_blocking = marked_lock_blocking
    owner_record.RecordFile.write = marked_write  # type: ignore[method-assign]
    kernel_wait.KernelWait.granted = marked_granted  # type: ignore[method-assign]


def _waiter(pack: str, conn: Connection) -> None:
    """The receiving process: blocks on the lock each time it is told to, and reports its marks."""
    from grex_locks import PackLock

    marks: dict[str, float] = {}
    _instrument(marks)
    lock = PackLock(pack)
    fd = os.open(lock.path, os.O_RDWR)
    never = threading.Event()
    acquire: dict[str, Callable[[], Any]] = {
        "PackLock": lock.acquire,
        "timeout armed": lambda: lock.acquire(timeout=60),
        "cancel armed": lambda: lock.acquire(cancel=never),
    }
    record = _BareRecord(os.path.join(os.path.dirname(pack), "bare.owner"))
    conn.send(_warm(lock, marks))
    while (kind := conn.recv()) is not None:
        marks.clear()
        conn.send("waiting")
        if kind == "raw flock":
            fcntl.flock(fd, fcntl.LOCK_EX)
            marks["returned"] = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif kind == "raw + record":
            fcntl.flock(fd, fcntl.LOCK_EX)
            marks["grant"] = marks["running"] = marks["write_begins"] = time.monotonic()
            record.write()
            marks["returned"] = marks["write_done"] = time.monotonic()
            record.blank()
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            acquire[kind]()
            marks["returned"] = time.monotonic()
            marks.setdefault("running", marks.get("grant", marks["returned"]))
            lock.release()
        conn.send(dict(marks))


class _BareRecord:
    """The least an owner record costs after a grant, with no library: the steps by hand.

    Check the record file (one ``fstat``), stamp the time, finish the
    checksum, store into a mapped page: what any lock that records its owner
    must do once it holds the lock, whatever else it does before.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, 256)
        self._map = mmap.mmap(self._fd, 256)
        self._head = b'{"pid":%d,"thread":"MainThread","tier":2,"acquired_at":' % os.getpid()
        self._crc = zlib.crc32(self._head)
        self._written = 0

    def write(self) -> None:
        if os.fstat(self._fd).st_size < 256:
            raise RuntimeError("the record file shrank")
        us = time.time_ns() // 1000
        tail = b"%d.%06d" % (us // 1_000_000, us % 1_000_000)
        data = b'%s%s,"check":"%08x"}' % (self._head, tail, zlib.crc32(tail, self._crc))
        self._map[: len(data)] = data
        self._written = len(data)

    def blank(self) -> None:
        self._map[: self._written] = b" " * self._written


def _warm(lock: Any, marks: dict[str, float], cycles: int = 3000) -> dict[str, float]:
    """The record write and a whole uncontended acquire, timed warm (median µs)."""
    writes: list[float] = []
    acquires: list[float] = []
    for _ in range(cycles):
        began = time.monotonic()
        lock.acquire()
        ended = time.monotonic()
        lock.release()
        writes.append(marks["write_done"] - marks["write_begins"])
        acquires.append(ended - began)
    return {
        "write": statistics.median(writes[cycles // 3 :]) * 1e6,
        "acquire": statistics.median(acquires[cycles // 3 :]) * 1e6,
    }


def _recv(conn: Connection) -> Any:
    if not conn.poll(DEADLINE):
        raise SystemExit(f"the waiting process did not answer within {DEADLINE:.0f} s")
    return conn.recv()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _hand_offs(
    holder: Any, trials: int, idle_ms: float
) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """Run the hand-offs: the waiter's warm figures, and each step's times by kind (µs)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    pack = str(holder.path.parent)
    process = context.Process(target=_waiter, args=(pack, theirs), daemon=True)
    process.start()
    warm = _recv(ours)
    after: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    for trial in range(trials):
        for kind in KINDS[trial % len(KINDS) :] + KINDS[: trial % len(KINDS)]:
            holder.acquire()
            ours.send(kind)
            _recv(ours)
            time.sleep(idle_ms / 1000)  # the waiter blocks, and its caches go cold
            released = time.monotonic()
            holder.release()
            for step, at in _recv(ours).items():
                after[kind].setdefault(step, []).append((at - released) * 1e6)
    ours.send(None)
    process.join(DEADLINE)
    return warm, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60, help="hand-offs per kind of waiter")
    parser.add_argument("--idle", type=float, default=30.0, help="ms the waiter sleeps first")
    parser.add_argument("--dir", default="/var/tmp", help="where the lock file goes")  # noqa: S108
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from grex_locks import PackLock

    scratch = tempfile.mkdtemp(prefix="grex-profile-", dir=args.dir)
    try:
        warm, after = _hand_offs(PackLock(os.path.join(scratch, "pack")), args.trials, args.idle)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"lock file on {args.dir}; 1-min load {load:.2f} on {os.cpu_count()} CPUs")
    print(f"{args.trials} hand-offs per kind, waiter idle {args.idle:.0f} ms before each")
    print("\nWhen each step happened, µs after the holder's release() began (median; p10-p90)")
    print(f"  {'step':52}" + "".join(f"{kind:>20}" for kind in KINDS))
    for step, what in STEPS:
        cells = []
        for kind in KINDS:
            got = after[kind].get(step)
            cells.append(
                "-"
                if not got
                else f"{statistics.median(got):.0f} ({_pct(got, 0.1):.0f}-{_pct(got, 0.9):.0f})"
            )
        print(f"  {what:52}" + "".join(f"{cell:>20}" for cell in cells))

    def span(kind: str, start: str, end: str) -> float:
        steps = after[kind]
        return statistics.median(b - a for a, b in zip(steps[start], steps[end], strict=True))

    print("\nAfter the grant, cold (the hand-offs above) against warm (an uncontended loop)")
    bare = span("raw + record", "write_begins", "write_done")
    write = span("PackLock", "write_begins", "write_done")
    print(f"  a minimal record written by hand: {bare:.1f} µs cold")
    print(f"  PackLock's record write: {write:.1f} µs cold, {warm['write']:.1f} warm")
    grant_to_return = span("PackLock", "grant", "returned")
    print(f"  PackLock, grant -> acquire() returned: {grant_to_return:.1f} µs cold; a whole")
    print(f"  uncontended acquire() (flock, queue, tier, record): {warm['acquire']:.1f} µs warm")
    raw = statistics.median(after["raw flock"]["returned"])
    ratios = ", ".join(
        f"{kind} {statistics.median(after[kind]['returned']) / raw:.2f}x" for kind in KINDS[1:]
    )
    print(f"\nacquire() returned, median, against raw flock's ({raw:.0f} µs): {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
