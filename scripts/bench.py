"""Benchmark grex_locks against raw flock, portalocker, filelock and fasteners.

    python scripts/bench.py [--quick] [--json] [--plot FILE.png] [--only SCENARIO ...]

Scenarios (one function each, below): uncontended, contention, handoff,
timeouts, threads, diagnostics, many_packs, scheduler. A scenario whose
grex_locks feature does not exist yet says "skipped (not available)". The
libraries sit behind the adapters in ``bench_peers.py``; adding one is a
small class there and one line in its ``PEERS``.

Method. Every library runs on the same machine, in the same run, in the same
worker processes. Each scenario repeats its measurement and interleaves the
repetitions across libraries (A B C, B C A, ...), so a burst of noise hits
them all alike; figures are medians unless a column says otherwise, and
every ratio names its reference. Worker processes come from
``multiprocessing.get_context("spawn")``; every wait on them has a deadline,
so a hung lock shows up as a failure instead of a hung benchmark.
``time.monotonic()`` is the system-wide CLOCK_MONOTONIC on Linux, so times
taken in two processes compare directly.

The process exits non-zero when a lock let two holders in at once (a lost
increment) where it promises not to, or when a scenario failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_peers import (
    MAX_WAIT,
    PEERS,
    PROCESS_COUNTS,
    QUICK_CALL,
    Peer,
    Workers,
    available,
    grex_has,
    grex_locks,
    label,
    make,
    read_counter,
)

EXCLUSIVE = ["flock", "portalocker", "portalocker-blocking", "filelock", "fasteners"]
GREX = ["grex", "grex+timeout"]
READ_WRITE = ["flock-sh", "portalocker-sh", "fasteners-r", "grex-read"]
READ_WRITE += ["flock-ex", "portalocker-ex", "fasteners-w", "grex-write"]
#: How long the handoff waiter is given to block before the holder lets go.
SETTLE = 0.01
CAVEAT = (
    "Zero think-time loops reward unfairness: a process that re-takes the lock the instant "
    "it let go wins cycles/s while the others starve. Worst wait and handoff latency are "
    "the fair comparison."
)


@dataclass(frozen=True)
class Settings:
    uncontended_reps: int
    uncontended_cycles: int
    contention_reps: int
    contention_seconds: float
    handoff_trials: int
    timeout: float
    cancel_after: float
    timeout_trials: int
    thread_reps: int
    thread_seconds: float
    scan_packs: int
    scan_reps: int
    diagnose_calls: int
    many_packs: int


QUICK = Settings(5, 1000, 2, 0.3, 20, 0.1, 0.05, 8, 1, 0.3, 10_000, 3, 30, 20_000)
FULL = Settings(15, 3000, 3, 1.5, 50, 0.2, 0.05, 25, 3, 1.0, 10_000, 7, 100, 100_000)


@dataclass
class Section:
    """One table of the report: rows of formatted cells, and the raw figures for JSON."""

    key: str
    title: str
    method: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this run


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Record a failure of the run and say it at once, loudly."""
        self.failures.append(message)
        print(f"\n!!!!!!!! {message}\n", file=sys.stderr)

    def target(
        self, goal: str, measured: float | None, limit: float, fmt: str, *, at_least: bool = False
    ) -> None:
        """Record a target: ``measured`` must be at most (or ``at_least``) ``limit``."""
        met = None if measured is None else (measured >= limit if at_least else measured <= limit)
        shown = "not measured" if measured is None else fmt.format(measured)
        self.targets.append(Target(goal, shown, met))

    def section(self, key: str) -> Section | None:
        return next((s for s in self.sections if s.key == key), None)


class Bench:
    """The run: settings, a scratch directory, a reusable worker pool and the report."""

    def __init__(self, settings: Settings, root: Path) -> None:
        self.s = settings
        self.root = root
        self.report = Report()
        self._pool: Workers | None = None

    def workers(self, n: int) -> Workers:
        if self._pool is not None and len(self._pool) < n:
            self.drop_workers()
        if self._pool is None:
            self._pool = Workers(n)
        return self._pool

    def drop_workers(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def keys(self, wanted: Sequence[str], section: Section) -> list[str]:
        """The locks of ``wanted`` this checkout can build; the others noted as skipped."""
        keys = [key for key in wanted if available(key)]
        for key in wanted:
            if key not in keys:
                section.notes.append(f"{label(key)}: skipped (not available)")
        return keys

    def pack(self, scenario: str, key: str) -> Path:
        path = self.root / scenario / key.replace("+", "-")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def counter(self, pack: Path) -> Path:
        path = pack / "counter"
        path.write_bytes(b"%20d" % 0)
        return path


# ---------------------------------------------------------------- helpers


def rotated(keys: Sequence[str], by: int) -> list[str]:
    """``keys`` starting at a different place each repetition: interleaving without bias."""
    if not keys:
        return []
    by %= len(keys)
    return [*keys[by:], *keys[:by]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or ref == 0 or math.isnan(value) or math.isnan(ref):
        return "-"
    return f"{value / ref:.2f}x"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def cycle_us(cycle: Callable[[], None], cycles: int) -> float:
    start = time.perf_counter()
    for _ in range(cycles):
        cycle()
    return (time.perf_counter() - start) / cycles * 1e6


def peer_cycle(peer: Peer) -> Callable[[], None]:
    acquire, release = peer.acquire, peer.release

    def cycle() -> None:
        acquire()
        release()

    return cycle


def interleaved_us(cycles: dict[str, Callable[[], None]], reps: int, n: int) -> dict[str, float]:
    """Median µs per cycle of each entry, the repetitions interleaved across entries."""
    names = list(cycles)
    for name in names:  # warm-up
        cycle_us(cycles[name], max(10, n // 10))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in rotated(names, rep):
            samples[name].append(cycle_us(cycles[name], n))
    return {name: median(values) for name, values in samples.items()}


# ---------------------------------------------------------------- scenarios


def uncontended(b: Bench) -> None:
    ex = Section(
        "uncontended",
        "1a. Uncontended acquire+release, one process",
        f"µs per cycle, median of {b.s.uncontended_reps} interleaved repetitions of "
        f"{b.s.uncontended_cycles} cycles; each object reused across cycles",
        ["lock", "µs/cycle", "vs portalocker.Lock"],
    )
    rw = Section(
        "uncontended_rw",
        "1b. Uncontended shared / exclusive acquire+release, one process",
        "as 1a; each row against portalocker.Lock with the same flag (SHARED or EXCLUSIVE)",
        ["lock", "µs/cycle", "vs portalocker same mode"],
    )
    b.report.sections += [ex, rw]
    keys = b.keys(EXCLUSIVE + GREX, ex)
    rw_keys = b.keys(READ_WRITE, rw)
    peers = {key: make(key, b.pack("uncontended", key)) for key in keys + rw_keys}
    try:
        us = interleaved_us(
            {key: peer_cycle(peer) for key, peer in peers.items()},
            b.s.uncontended_reps,
            b.s.uncontended_cycles,
        )
    finally:
        for peer in peers.values():
            peer.close()
    for key in keys:
        ex.rows.append([label(key), f"{us[key]:.2f}", ratio(us[key], us["portalocker"])])
    for key in rw_keys:
        ref = "portalocker-sh" if PEERS[key].shared else "portalocker-ex"
        rw.rows.append([label(key), f"{us[key]:.2f}", ratio(us[key], us.get(ref))])
    ex.data = {key: {"us_per_cycle": us[key]} for key in keys}
    rw.data = {key: {"us_per_cycle": us[key]} for key in rw_keys}
    grex = us.get("grex")
    b.report.target(
        "uncontended PackLock (with owner record) <= 1.0x portalocker.Lock",
        None if grex is None else grex / us["portalocker"],
        1.0,
        "{:.2f}x",
    )


def _contend_once(b: Bench, pool: Workers, key: str, n: int) -> dict[str, Any]:
    pack = b.pack("contention", key)
    counter = b.counter(pack)
    for i in range(n):
        pool.send(
            i, "contend", key, str(pack), counter=str(counter), n=n, seconds=b.s.contention_seconds
        )
    deadline = b.s.contention_seconds + MAX_WAIT + 10
    results = [pool.recv(i, deadline) for i in range(n)]
    waits = array("d")
    for result in results:
        waits.frombytes(result["waits"])
    total = sum(r["cycles"] for r in results)
    final = read_counter(counter)
    if final != total:
        b.report.fail(
            f"LOCK VIOLATION: {label(key)} with {n} processes: the counter reads {final} "
            f"after {total} locked increments"
        )
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "cycles_per_s": total / elapsed,
        "median_wait": median(waits),
        "worst_wait": max(waits, default=float("nan")),
        "per_process": [r["cycles"] for r in results],
        "count_ok": final == total,
    }


def contention(b: Bench) -> None:
    sec = Section(
        "contention",
        "2. Cross-process contention: acquire, increment a shared counter, release",
        f"spawn processes released by one barrier, {b.s.contention_seconds} s each, "
        f"{b.s.contention_reps} interleaved repetition(s); cycles/s median over repetitions, "
        "worst wait the worst of all; throughput against portalocker.lock (blocking), "
        "worst wait against raw flock. " + CAVEAT,
        [
            "lock",
            "procs",
            "cycles/s",
            "vs pl-blocking",
            "median wait ms",
            "worst wait ms",
            "vs flock worst",
            "min/max per proc",
            "count",
        ],
    )
    b.report.sections.append(sec)
    keys = b.keys(EXCLUSIVE + GREX, sec)
    pool = b.workers(max(PROCESS_COUNTS))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (k, n): [] for k in keys for n in PROCESS_COUNTS
    }
    for rep in range(b.s.contention_reps):
        for n in PROCESS_COUNTS:
            for key in rotated(keys, rep + n):
                runs[key, n].append(_contend_once(b, pool, key, n))
    summary: dict[tuple[str, int], dict[str, Any]] = {}
    for (key, n), results in runs.items():
        per = [c for r in results for c in r["per_process"]]
        summary[key, n] = {
            "cycles_per_s": median([r["cycles_per_s"] for r in results]),
            "median_wait": median([r["median_wait"] for r in results]),
            "worst_wait": max(r["worst_wait"] for r in results),
            "min_max": f"{min(per)}/{max(per)}",
            "count_ok": all(r["count_ok"] for r in results),
        }
    for n in PROCESS_COUNTS:
        ref_tp = summary[("portalocker-blocking", n)]["cycles_per_s"]
        ref_worst = summary[("flock", n)]["worst_wait"]
        for key in keys:
            got = summary[key, n]
            sec.rows.append(
                [
                    label(key),
                    str(n),
                    f"{got['cycles_per_s']:.0f}",
                    ratio(got["cycles_per_s"], ref_tp),
                    ms(got["median_wait"]),
                    ms(got["worst_wait"]),
                    ratio(got["worst_wait"], ref_worst),
                    got["min_max"],
                    "ok" if got["count_ok"] else "VIOLATION",
                ]
            )
    sec.data = {f"{key}@{n}": value for (key, n), value in summary.items()}
    if not any(k in keys for k in GREX):
        b.report.target("8-process worst wait <= raw flock's", None, 1.0, "")
        b.report.target("4-process throughput >= 1.0x portalocker blocking", None, 1.0, "")
    for key in [k for k in GREX if k in keys]:
        worst = summary[key, 8]["worst_wait"] / summary[("flock", 8)]["worst_wait"]
        b.report.target(f"8-process worst wait, {label(key)} <= raw flock's", worst, 1.0, "{:.2f}x")
        tp = summary[key, 4]["cycles_per_s"] / summary[("portalocker-blocking", 4)]["cycles_per_s"]
        b.report.target(
            f"4-process throughput, {label(key)} >= 1.0x portalocker blocking",
            tp,
            1.0,
            "{:.2f}x",
            at_least=True,
        )


def _handoff_once(b: Bench, pool: Workers, key: str) -> float:
    pack = str(b.pack("handoff", key))
    pool.call(0, "hold", key, pack)
    pool.send(1, "wait", key, pack)
    pool.recv(1, QUICK_CALL, "note")
    # A random phase against the peer's polling period, so polling is neither lucky nor unlucky.
    time.sleep(SETTLE + random.uniform(0, PEERS[key].cls.poll_period))
    released = pool.call(0, "release", key, pack)
    granted = pool.recv(1, MAX_WAIT + 10)
    if granted < released:
        b.report.fail(f"LOCK VIOLATION: {label(key)} granted the waiter before the holder let go")
    return float(granted - released)


def handoff(b: Bench) -> None:
    sec = Section(
        "handoff",
        "3. Handoff latency: holder process releases -> blocked process has the lock",
        f"{b.s.handoff_trials} interleaved trials; t0 just before release() in the holder, "
        "t1 just after acquire() returned in the waiter (CLOCK_MONOTONIC is system-wide); "
        "release sent a random moment into the peer's polling period",
        ["lock", "median ms", "p90 ms", "max ms", "vs raw flock (median)"],
    )
    b.report.sections.append(sec)
    order = ["flock", "portalocker-blocking", *GREX, "filelock", "fasteners", "portalocker"]
    keys = b.keys(order, sec)
    pool = b.workers(2)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for trial in range(b.s.handoff_trials):
        for key in rotated(keys, trial):
            samples[key].append(_handoff_once(b, pool, key))
    floor = median(samples["flock"])
    for key, values in samples.items():
        sec.rows.append(
            [
                label(key),
                ms(median(values)),
                ms(pct(values, 0.9)),
                ms(max(values)),
                ratio(median(values), floor),
            ]
        )
        sec.data[key] = {"median": median(values), "p90": pct(values, 0.9), "max": max(values)}
    armed = samples.get("grex+timeout")
    b.report.target(
        "handoff with timeout armed <= 3x raw blocking flock",
        None if armed is None else median(armed) / floor,
        3.0,
        "{:.2f}x",
    )


def timeouts(b: Bench) -> None:
    sec = Section(
        "timeouts",
        "4. Timeout overshoot and cancel latency while another process holds the lock",
        f"overshoot = time acquire(timeout={b.s.timeout}) took - {b.s.timeout} s; cancel latency"
        f" = from Event.set() in another thread ({b.s.cancel_after} s in) to acquire returning;"
        f" {b.s.timeout_trials} interleaved trials. Raw flock and portalocker blocking cannot "
        "time out or be cancelled",
        ["lock", "overshoot median ms", "overshoot max ms", "cancel median ms", "cancel max ms"],
    )
    b.report.sections.append(sec)
    keys = b.keys(["portalocker", "filelock", "fasteners", "grex"], sec)
    timed = [key for key in keys if PEERS[key].cls.can_timeout]
    cancellable = [key for key in keys if PEERS[key].cls.can_cancel]
    pool = b.workers(2)
    packs = {key: str(b.pack("timeouts", key)) for key in keys}
    over: dict[str, list[float]] = {key: [] for key in timed}
    late: dict[str, list[float]] = {key: [] for key in cancellable}
    for key in keys:
        pool.call(0, "hold", key, packs[key])
    for trial in range(b.s.timeout_trials):
        for key in rotated(timed, trial):
            over[key].append(pool.call(1, "timeout_once", key, packs[key], b.s.timeout))
        for key in rotated(cancellable, trial):
            late[key].append(pool.call(1, "cancel_once", key, packs[key], b.s.cancel_after))
    for key in keys:
        pool.call(0, "release", key, packs[key])
    for key in keys:
        o, c = over.get(key), late.get(key)
        sec.rows.append(
            [label(key)]
            + ([ms(median(o)), ms(max(o))] if o else ["n/a", "n/a"])
            + ([ms(median(c)), ms(max(c))] if c else ["n/a", "n/a"])
        )
        sec.data[key] = {
            "overshoot_median": median(o) if o else None,
            "overshoot_max": max(o) if o else None,
            "cancel_median": median(c) if c else None,
            "cancel_max": max(c) if c else None,
        }
    grex_over, grex_late = over.get("grex"), late.get("grex")
    b.report.target(
        "timeout overshoot <= 2 ms (median)",
        None if not grex_over else median(grex_over) * 1e3,
        2.0,
        "{:.2f} ms",
    )
    b.report.target(
        "cancel latency <= 5 ms (median)",
        None if not grex_late else median(grex_late) * 1e3,
        5.0,
        "{:.2f} ms",
    )


def threads(b: Bench) -> None:
    n = 4
    sec = Section(
        "threads",
        f"5. Threads: {n} threads in one process, each with its own lock object on one path",
        f"{b.s.thread_seconds} s per run, {b.s.thread_reps} interleaved repetition(s); an "
        "'overlap' is a thread entering while another is inside, 'lost' the increments the "
        "shared counter is missing; cycles/s against raw flock",
        ["lock", "cycles/s", "vs raw flock", "min/max per thread", "overlaps", "lost", "verdict"],
    )
    b.report.sections.append(sec)
    keys = b.keys([*EXCLUSIVE, "grex"], sec)
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    for rep in range(b.s.thread_reps):
        for key in rotated(keys, rep):
            pack = b.pack("threads", key)
            counter = b.counter(pack)
            result = b.workers(1).call(
                0,
                "threads",
                key,
                str(pack),
                counter=str(counter),
                n=n,
                seconds=b.s.thread_seconds,
                timeout=b.s.thread_seconds + MAX_WAIT + 10,
            )
            if result["hung"]:
                b.drop_workers()  # a thread is stuck in that worker for good
            results[key].append(result)
    rates = {
        key: median([sum(r["cycles"]) / r["elapsed"] for r in rs]) for key, rs in results.items()
    }
    for key, rs in results.items():
        per = [c for r in rs for c in r["cycles"]]
        overlaps = sum(r["overlaps"] for r in rs)
        lost = sum(sum(r["cycles"]) - r["final"] for r in rs)
        errors = [e for r in rs for e in r["errors"]] + ["hung" for r in rs if r["hung"]]
        unsafe = overlaps or lost or errors
        reason = PEERS[key].cls.thread_unsafe
        if not unsafe:
            verdict = "safe"
        elif reason:
            verdict = "UNSAFE (known)"
            sec.notes.append(f"{label(key)} is unsafe here: {reason}")
        else:
            verdict = "UNSAFE"
            sec.notes.append(f"{label(key)} is unsafe here: {'; '.join(errors) or 'lost updates'}")
            if key.startswith("grex"):
                b.report.fail(f"LOCK VIOLATION: {label(key)} across {n} threads: {verdict}")
        sec.rows.append(
            [
                label(key),
                f"{rates[key]:.0f}",
                ratio(rates[key], rates.get("flock")),
                f"{min(per)}/{max(per)}",
                str(overlaps),
                str(lost),
                verdict,
            ]
        )
        sec.data[key] = {"cycles_per_s": rates[key], "overlaps": overlaps, "lost": lost}
        sec.data[key] |= {"verdict": verdict, "errors": errors}


def _make_packs(root: Path, n: int) -> list[Path]:
    packs = [root / f"p{i:05d}" for i in range(n)]
    for pack in packs:
        pack.mkdir(parents=True)
        os.close(os.open(pack / ".grex-lock", os.O_WRONLY | os.O_CREAT, 0o644))
    return packs


def _timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median seconds of ``reps`` calls of ``fn``, and the last result."""
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def _kernel_table_lines() -> int:
    """Lines in the kernel's lock table now: what every diagnose() has to read and parse."""
    try:
        with open("/proc/locks", "rb") as table:
            return table.read().count(b"\n")
    except OSError:
        return -1


def _timed_after_idle(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes when nothing read the kernel lock table just before.

    Back-to-back reads of /proc/locks are cheap, but the first after an idle moment can cost
    milliseconds (on Linux the walk takes a per-CPU semaphore for writing, which waits for an
    RCU grace period): the cost a lone ``diagnose()`` pays.
    """
    time.sleep(0.1)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def diagnostics(b: Bench) -> None:
    held_n = stale_n = 5
    sec = Section(
        "diagnostics",
        f"6. diagnose() on one held lock; scan() over {b.s.scan_packs:,} pack locks",
        f"{held_n} held by a live process, {stale_n} left stale by a SIGKILLed holder; medians "
        f"of {b.s.diagnose_calls} back-to-back diagnose() calls, of 5 after 0.1 s idle, and of "
        f"{b.s.scan_reps} scan() calls; reference: "
        "`lslocks --json` (the whole kernel lock table, paths resolved), same holders",
        ["what", "median ms", "vs lslocks --json", "result"],
    )
    b.report.sections.append(sec)
    if not grex_has("diagnose", "scan", "PackLock", "set_tier_check"):
        sec.notes.append("grex_locks diagnose()/scan(): skipped (not available)")
        b.report.target("scan() of 10,000 locks <= 1 s", None, 1.0, "")
        return
    assert grex_locks is not None
    root = b.root / "scan"
    packs = _make_packs(root, b.s.scan_packs)
    stride = len(packs) // (held_n + stale_n)
    chosen = [str(packs[i * stride]) for i in range(held_n + stale_n)]
    holder, doomed = Workers(1), Workers(1)
    try:
        doomed.call(0, "hold_packs", chosen[held_n:])
        doomed.kill(0)
        holder.call(0, "hold_packs", chosen[:held_n])
        lock_file = Path(chosen[0]) / ".grex-lock"
        table_lines = _kernel_table_lines()
        diag_s, diag = _timed(lambda: grex_locks.diagnose(lock_file), b.s.diagnose_calls)
        alone_s = median(
            [_timed_after_idle(lambda: grex_locks.diagnose(lock_file)) for _ in range(5)]
        )
        scan_s, found = _timed(lambda: list(grex_locks.scan(root)), b.s.scan_reps)
        lslocks_s, out = _timed(
            lambda: subprocess.run(["lslocks", "--json"], capture_output=True, check=True).stdout,
            b.s.scan_reps,
        )
    finally:
        holder.close()
        doomed.close()
    states = Counter(getattr(d.state, "name", str(d.state)) for d in found)
    table = json.loads(out or b"{}").get("locks", [])
    sec.rows += [
        [
            "diagnose(held lock)",
            ms(diag_s),
            ratio(diag_s, lslocks_s),
            f"{getattr(diag.state, 'name', diag.state)}; /proc/locks had {table_lines} lines",
        ],
        ["diagnose(held lock), after 0.1 s idle", ms(alone_s), ratio(alone_s, lslocks_s), ""],
        [
            f"scan({len(packs):,} locks)",
            ms(scan_s),
            ratio(scan_s, lslocks_s),
            ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
        ],
        ["lslocks --json", ms(lslocks_s), "1.00x", f"{len(table)} locks in the kernel table"],
    ]
    if (
        len(found) != len(packs)
        or states.get("HELD") != held_n
        or states.get("STALE_RECORD") != stale_n
    ):
        sec.notes.append(
            f"scan() expected {len(packs)} locks with HELD {held_n}, STALE_RECORD {stale_n}"
        )
    sec.data = {
        "diagnose_s": diag_s,
        "diagnose_after_idle_s": alone_s,
        "proc_locks_lines": table_lines,
    }
    sec.data |= {"scan_s": scan_s, "lslocks_s": lslocks_s}
    sec.data |= {"scan_states": dict(states), "locks": len(found)}
    b.report.target(f"scan() of {len(packs):,} locks <= 1 s", scan_s, 1.0, "{:.3f} s")


def many_packs(b: Bench) -> None:
    n = b.s.many_packs
    sec = Section(
        "many_packs",
        f"7. {n:,} distinct packs acquired and released in turn, in one fresh process",
        "each pack a new PackLock (its directory created by the constructor), alternating in "
        "10 chunks with the reference: mkdir + open + flock + unlock + close on fresh packs; "
        "descriptors counted in /proc/self/fd, RSS from /proc/self/statm, peak from ru_maxrss",
        ["figure", "value", "target"],
    )
    b.report.sections.append(sec)
    if not grex_has("PackLock"):
        sec.notes.append("grex_locks PackLock: skipped (not available)")
        b.report.target(f"after {n:,} distinct packs: registry 0, descriptors, RSS", None, 0, "")
        return
    n_raw = min(n, 5000)
    fresh = Workers(1)
    try:
        got = fresh.call(0, "many_packs", str(b.root / "many"), n, n_raw, timeout=900)
    finally:
        fresh.close()
    if got["error"]:
        b.report.fail(f"{n:,} packs: {got['error']}")
    registry = got["registry"]
    done = got["packs"]
    sec.rows += [
        ["packs done", f"{done:,}", f"{n:,}"],
        ["µs per pack (mkdir + open + lock + record)", f"{got['us_per_pack']:.1f}", ""],
        [f"  raw mkdir + open + flock + close ({n_raw:,})", f"{got['raw_us_per_pack']:.1f}", ""],
        ["  ratio to raw", ratio(got["us_per_pack"], got["raw_us_per_pack"]), ""],
        ["open descriptors before / after", f"{got['fds_before']} / {got['fds_after']}", "equal"],
        ["registry size afterwards", "n/a" if registry is None else str(registry), "0"],
        ["peak RSS growth", f"{got['peak_rss_growth_mb']:.1f} MB", "< 10 MB"],
        ["RSS growth (now)", f"{got['rss_growth_mb']:.1f} MB", ""],
    ]
    sec.data = got
    goal = f"after {done:,} distinct packs:"
    b.report.target(f"{goal} registry 0", registry, 0, "{}")
    fds = got["fds_after"] - got["fds_before"]
    b.report.target(f"{goal} descriptors at baseline", fds, 0, "{:+d} fds")
    b.report.target(f"{goal} RSS growth < 10 MB", got["peak_rss_growth_mb"], 10.0, "{:.1f} MB")


def scheduler(b: Bench) -> None:
    sec = Section(
        "scheduler",
        "8. Scheduler permit acquire+release, uncontended, one process",
        f"µs per cycle, median of {b.s.uncontended_reps} interleaved repetitions of "
        f"{b.s.uncontended_cycles} cycles; in-process permits against threading.BoundedSemaphore, "
        "slots_dir permits (a slot file with an owner record) against a PackLock",
        ["what", "µs/cycle", "vs reference"],
    )
    b.report.sections.append(sec)
    if not grex_has("Scheduler", "PackLock"):
        sec.notes.append("grex_locks Scheduler: skipped (not available)")
        return
    assert grex_locks is not None
    local = grex_locks.Scheduler(4)
    slots = grex_locks.Scheduler(4, slots_dir=b.root / "slots")
    semaphore = threading.BoundedSemaphore(4)
    pack = make("grex", b.pack("scheduler", "grex"))

    def permit(scheduler: Any) -> Callable[[], None]:
        return lambda: scheduler.acquire().release()

    def sem_cycle() -> None:
        semaphore.acquire()
        semaphore.release()

    us = interleaved_us(
        {
            "semaphore": sem_cycle,
            "local": permit(local),
            "pack": peer_cycle(pack),
            "slots": permit(slots),
        },
        b.s.uncontended_reps,
        b.s.uncontended_cycles,
    )
    sec.rows += [
        ["threading.BoundedSemaphore(4)", f"{us['semaphore']:.2f}", "1.00x"],
        ["Scheduler(4)", f"{us['local']:.2f}", ratio(us["local"], us["semaphore"])],
        ["grex_locks PackLock", f"{us['pack']:.2f}", "1.00x"],
        ["Scheduler(4, slots_dir=...)", f"{us['slots']:.2f}", ratio(us["slots"], us["pack"])],
    ]
    sec.data = us


SCENARIOS: list[Callable[[Bench], None]] = [
    uncontended,
    contention,
    handoff,
    timeouts,
    threads,
    diagnostics,
    many_packs,
    scheduler,
]


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tmp": tempfile.gettempdir(),
        "load_before": os.getloadavg()[0],
        "versions": {
            d: version(d) for d in ("grex-locks", "portalocker", "filelock", "fasteners", "psutil")
        },
    }


def render(report: Report, info: dict[str, Any], command: str) -> str:
    lines = [
        "grex_locks benchmark",
        f"  command: {command}",
        f"  machine: {info['platform']}, {info['cpus']} CPUs, Python {info['python']}",
        f"  load average (1 min): {info['load_before']:.1f} before, "
        f"{info['load_after']:.1f} after (this run's own processes included)",
        "  versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "  method: same machine, same run, same worker processes; repetitions interleaved "
        "across libraries; medians; each ratio names its reference",
    ]
    for sec in report.sections:
        lines += ["", sec.title]
        lines += textwrap.wrap(sec.method, 100, initial_indent="  (", subsequent_indent="   ")
        lines[-1] += ")"
        if sec.rows:
            widths = [
                max(len(row[i]) for row in [sec.header, *sec.rows]) for i in range(len(sec.header))
            ]
            for row in [sec.header, *sec.rows]:
                cells = [row[0].ljust(widths[0])] + [
                    c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
                ]
                lines.append("  " + "  ".join(cells))
        lines += [f"  note: {note}" for note in sec.notes]
    lines += ["", "Targets (from the issues)"]
    width = max((len(t.goal) for t in report.targets), default=0)
    for t in report.targets:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t.met]
        lines.append(f"  {t.goal.ljust(width)}  {t.measured:>14}  {verdict}")
    lines += ["", *textwrap.wrap("Caveat: " + CAVEAT, 100)]
    for note in report.notes:
        lines += textwrap.wrap("WARNING: " + note, 100)
    if report.failures:
        lines += ["", "FAILURES:"] + [f"  {f}" for f in report.failures]
    return "\n".join(lines)


def plot(report: Report, path: Path, caption: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    hand = report.section("handoff")
    if hand and hand.data:
        keys = list(hand.data)
        colors = ["tab:orange" if k.startswith("grex") else "tab:blue" for k in keys]
        medians = [hand.data[k]["median"] * 1e3 for k in keys]
        left.barh([label(k) for k in keys], medians, color=colors)
        left.set_xscale("log")
        left.set_xlabel("median handoff latency, ms (log scale; lower is better)")
        left.invert_yaxis()
        left.set_title("Handoff: holder releases -> waiter has the lock")
    cont = report.section("contention")
    if cont and cont.data:
        keys = list(dict.fromkeys(k.split("@")[0] for k in cont.data))
        width = 0.8 / len(PROCESS_COUNTS)
        for j, n in enumerate(PROCESS_COUNTS):
            xs = [i + j * width for i in range(len(keys))]
            right.bar(
                xs,
                [cont.data[f"{k}@{n}"]["cycles_per_s"] for k in keys],
                width,
                label=f"{n} processes",
            )
        right.set_xticks(
            [i + width for i in range(len(keys))], [label(k) for k in keys], rotation=30, ha="right"
        )
        right.set_yscale("log")
        right.set_ylabel("cycles/s (log scale; higher is better)")
        right.set_title("Contended throughput (zero think time)")
        right.legend()
    fig.suptitle(caption, fontsize="small")
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


def run(b: Bench, scenarios: Sequence[Callable[[Bench], None]]) -> None:
    for i, scenario in enumerate(scenarios, 1):
        print(f"[{i}/{len(scenarios)}] {scenario.__name__} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            scenario(b)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            b.report.fail(f"scenario {scenario.__name__} failed: {exc}")
            b.drop_workers()
        print(f"      {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="grex-bench-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute instead of ~5")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw handoff and throughput")
    parser.add_argument(
        "--only", nargs="+", choices=[s.__name__ for s in SCENARIOS], help="run only these"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    scenarios = [s for s in SCENARIOS if not args.only or s.__name__ in args.only]
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    started = time.monotonic()
    with scratch() as root:
        b = Bench(settings, root)
        try:
            run(b, scenarios)
        finally:
            b.drop_workers()
    info["load_after"] = os.getloadavg()[0]
    info["seconds"] = round(time.monotonic() - started)
    print(f"total {info['seconds']} s", file=sys.stderr)
    if info["load_before"] > (os.cpu_count() or 1):
        b.report.notes.append(
            "the machine was busy before the run (load average above its CPU count): other "
            "processes competed for the CPUs, so latencies and their ratios are unreliable here"
        )
    report = b.report
    if args.json:
        out: dict[str, Any] = {"command": command, "machine": info, "settings": asdict(settings)}
        out |= {"sections": {s.key: s.data | {"notes": s.notes} for s in report.sections}}
        out |= {"targets": [asdict(t) for t in report.targets], "failures": report.failures}
        out |= {"warnings": report.notes}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(report, info, command))
    if args.plot:
        caption = f"{command}  |  {info['platform']}, {info['cpus']} CPUs, Python {info['python']}"
        plot(report, args.plot, caption)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
