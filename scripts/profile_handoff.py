"""Where a hand-off's time goes, step by step, in the process that receives the lock.

    python scripts/profile_handoff.py [--trials N] [--idle MS] [--dir DIR]

The bench's handoff scenario times a hand-off from outside: from just before
the holder's ``release()`` to just after the waiter's ``acquire()`` returned.
This script opens the waiter up. In the waiting process only, it wraps the
calls that mark each step — the kernel's grant, seen by the thread blocked in
``flock`` (the caller, or with ``timeout=`` / ``cancel=`` armed the helper
thread); the caller running again; the owner record's write, begun and done;
``acquire()`` returned — and prints when each happened, counted from the
holder's ``release()``. A bare ``fcntl.flock`` waiter runs in the same run as
the reference, each trial rotating through the kinds of waiter.

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
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

KINDS = ("raw flock", "PackLock", "timeout armed", "cancel armed")
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
    conn.send(_warm(lock, marks))
    while (kind := conn.recv()) is not None:
        marks.clear()
        conn.send("waiting")
        if kind == "raw flock":
            fcntl.flock(fd, fcntl.LOCK_EX)
            marks["returned"] = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            acquire[kind]()
            marks["returned"] = time.monotonic()
            marks.setdefault("running", marks.get("grant", marks["returned"]))
            lock.release()
        conn.send(dict(marks))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60, help="hand-offs per kind of waiter")
    parser.add_argument("--idle", type=float, default=30.0, help="ms the waiter sleeps first")
    parser.add_argument("--dir", default="/var/tmp", help="where the lock file goes")  # noqa: S108
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from grex_locks import PackLock

    scratch = tempfile.mkdtemp(prefix="grex-profile-", dir=args.dir)
    pack = os.path.join(scratch, "pack")
    holder = PackLock(pack)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_waiter, args=(pack, theirs), daemon=True)
    process.start()
    warm = _recv(ours)
    after: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    for trial in range(args.trials):
        for kind in KINDS[trial % len(KINDS) :] + KINDS[: trial % len(KINDS)]:
            holder.acquire()
            ours.send(kind)
            _recv(ours)
            time.sleep(args.idle / 1000)  # the waiter is blocked by now, and goes cold
            released = time.monotonic()
            holder.release()
            for step, at in _recv(ours).items():
                after[kind].setdefault(step, []).append((at - released) * 1e6)
    ours.send(None)
    process.join(DEADLINE)
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
    plain = after["PackLock"]

    def span(start: str, end: str) -> float:
        return statistics.median(b - a for a, b in zip(plain[start], plain[end], strict=True))

    print("\nPackLock's waiter after the grant, cold (above) against warm (an uncontended loop)")
    write = span("write_begins", "write_done")
    print(f"  record write: {write:.1f} µs cold, {warm['write']:.1f} warm")
    grant_to_return = span("grant", "returned")
    print(f"  grant -> acquire() returned: {grant_to_return:.1f} µs cold; a whole uncontended")
    print(f"  acquire() (try the flock, queue, tier, record) takes {warm['acquire']:.1f} µs warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
