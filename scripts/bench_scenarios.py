"""The benchmark's scenarios: one function each, every library side by side in one run.

A scenario takes the :class:`Bench` (settings, a scratch directory on the file
system under test, a reusable worker pool) and adds :class:`Section` tables and
:class:`Target` rows to its :class:`Report`. The libraries sit behind the
adapters of ``bench_peers.py`` (one :class:`~bench_peers.Peer` subclass each);
a scenario names them by key and never by library.

Method. Each scenario repeats its measurement and interleaves the repetitions
across libraries (A B C, B C A, ...), so a burst of noise hits them all alike.
Figures are medians with their spread (p10-p90 over repetitions, or min-max
where there are only a few), and every ratio names its reference. Workers come
from ``multiprocessing.get_context("spawn")``; every wait on them has a
deadline, so a hung lock shows up as a failure instead of a hung benchmark.
``time.monotonic()`` is the system-wide CLOCK_MONOTONIC on Linux, so times
taken in two processes compare directly.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench_peers import (
    MAX_WAIT,
    PEERS,
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
HANDOFF = ["flock", "portalocker-blocking", "grex", "grex+timeout", "grex+cancel"]
HANDOFF += ["filelock", "fasteners", "portalocker"]
#: How long the handoff waiter is given to block before the holder lets go.
SETTLE = 0.01
#: The scheduler of the busy-scheduler scenario: this many slots, all held elsewhere.
BUSY_SLOTS = 16
#: The timeout each of the busy scheduler's waiting threads passes to ``acquire``.
BUSY_TIMEOUT = 1.0
#: The floors scenario: this many threads or processes,
FLOOR_N = 4
#: W, the µs of busy work each baton thread does per turn (after, or before, waking the next),
BATON_WORK = (0, 5, 10, 20)
#: and G, the µs of busy work each flock process does between its unlock and its next lock.
FLOCK_GAPS = (0, 2, 5, 10, 20)
#: and the µs of busy work a raw flock waiter does right after its wake in the hand-off floor,
FLOOR_HANDOFF_WORK = (0, 2, 5, 10, 20)
#: and in its one two-sided variant, on each side (the holder's before its unlock).
FLOOR_HANDOFF_BOTH = 5
#: How many warm timings of the waiter's loop make its warm median.
FLOOR_WARM_TRIES = 200
#: The spin-loop calibration: the fastest of this many timings of this many iterations.
SPIN_CALIBRATION = (25, 20_000)
CAVEAT = (
    "Zero think-time loops reward unfairness: a process that re-takes the lock the instant "
    "it let go wins cycles/s while the others starve. Worst wait and handoff latency are "
    "the fair comparison."
)


@dataclass(frozen=True)
class Settings:
    uncontended_reps: int
    uncontended_cycles: int
    process_counts: tuple[int, ...]
    contention_reps: int
    contention_seconds: float
    handoff_trials: int
    timeout: float
    cancel_after: float
    timeout_trials: int
    thread_reps: int
    thread_seconds: float
    busy_tries: int
    busy_rounds: int
    scan_packs: int
    scan_reps: int
    diagnose_calls: int
    many_packs: int
    floor_reps: int
    floor_seconds: float
    floor_handoff_trials: int


QUICK = Settings(
    uncontended_reps=5,
    uncontended_cycles=500,
    process_counts=(4, 8),
    contention_reps=1,
    contention_seconds=0.3,
    handoff_trials=10,
    timeout=0.1,
    cancel_after=0.05,
    timeout_trials=5,
    thread_reps=1,
    thread_seconds=0.3,
    busy_tries=30,
    busy_rounds=2,
    scan_packs=2_000,
    scan_reps=2,
    diagnose_calls=30,
    many_packs=2_000,
    floor_reps=1,
    floor_seconds=0.25,
    floor_handoff_trials=30,
)
FULL = Settings(
    uncontended_reps=15,
    uncontended_cycles=3000,
    process_counts=(2, 4, 8),
    contention_reps=3,
    contention_seconds=1.5,
    handoff_trials=50,
    timeout=0.2,
    cancel_after=0.05,
    timeout_trials=25,
    thread_reps=5,
    thread_seconds=1.0,
    busy_tries=200,
    busy_rounds=5,
    scan_packs=10_000,
    scan_reps=7,
    diagnose_calls=100,
    many_packs=100_000,
    floor_reps=3,
    floor_seconds=0.5,
    floor_handoff_trials=100,
)


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
    """One row of the closing table: a figure, what the peers did in the same run, the goal."""

    figure: str
    grex: str
    peers: str
    measured: str
    target: str
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
        self,
        figure: str,
        value: float | None,
        limit: float,
        fmt: str,
        *,
        at_least: bool = False,
        against: str = "",
        grex: str = "",
        peers: str = "",
    ) -> None:
        """Record a target: ``value`` must be at most (or ``at_least``) ``limit``.

        ``fmt`` formats both numbers; ``against`` names the reference of a ratio.
        """
        met: bool | None = None
        shown = "not measured"
        suffix = f" {against}" if against else ""
        if value is not None and not math.isnan(value):
            met = value >= limit if at_least else value <= limit
            shown = fmt.format(value) + suffix
        goal = ("≥ " if at_least else "≤ ") + fmt.format(limit) + suffix
        self.targets.append(Target(figure, grex or "-", peers or "-", shown, goal, met))

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


T = TypeVar("T")


def rotated(keys: Sequence[T], by: int) -> list[T]:
    """``keys`` starting at a different place each repetition: interleaving without bias."""
    if not keys:
        return []
    by %= len(keys)
    return [*keys[by:], *keys[:by]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (p10 and p90 of 5 values are their min and max)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """p10-p90 of ``values``, each end formatted by ``fmt``."""
    if not values:
        return "-"
    return f"{fmt(pct(values, 0.1))}-{fmt(pct(values, 0.9))}"


def ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or ref == 0 or math.isnan(value) or math.isnan(ref):
        return "-"
    return f"{value / ref:.2f}x"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def us2(value: float) -> str:
    return f"{value:.2f}"


def x2(value: float) -> str:
    return f"{value:.2f}x"


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


def interleaved_us(
    cycles: dict[str, Callable[[], None]], reps: int, n: int
) -> dict[str, list[float]]:
    """µs per cycle of each entry, one sample per repetition, interleaved across entries."""
    names = list(cycles)
    for name in names:  # warm-up
        cycle_us(cycles[name], max(10, n // 10))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in rotated(names, rep):
            samples[name].append(cycle_us(cycles[name], n))
    return samples


def per_rep_ratios(values: Sequence[float], refs: Sequence[float]) -> list[float]:
    """Ratio of each repetition to the reference's same repetition (they ran side by side)."""
    return [v / r for v, r in zip(values, refs, strict=True) if r]


# ---------------------------------------------------------------- scenarios


def uncontended(b: Bench) -> None:
    per = f"{b.s.uncontended_reps} interleaved repetitions of {b.s.uncontended_cycles} cycles"
    ex = Section(
        "uncontended",
        "Uncontended acquire+release, one process",
        f"µs per cycle: median and p10-p90 over {per}; each object reused across cycles; the "
        "ratio's spread is over the repetitions' own ratios (each ran beside its reference)",
        ["lock", "µs/cycle", "p10-p90", "vs portalocker.Lock", "ratio p10-p90"],
    )
    rw = Section(
        "uncontended_rw",
        "Uncontended shared / exclusive acquire+release, one process",
        "as above; each row against portalocker.Lock with the same flag (SHARED or EXCLUSIVE)",
        ["lock", "µs/cycle", "p10-p90", "vs portalocker same mode", "ratio p10-p90"],
    )
    b.report.sections += [ex, rw]
    keys = b.keys(EXCLUSIVE + GREX, ex)
    rw_keys = b.keys(READ_WRITE, rw)
    peers = {key: make(key, b.pack("uncontended", key)) for key in keys + rw_keys}
    try:
        samples = interleaved_us(
            {key: peer_cycle(peer) for key, peer in peers.items()},
            b.s.uncontended_reps,
            b.s.uncontended_cycles,
        )
    finally:
        for peer in peers.values():
            peer.close()
    us = {key: median(values) for key, values in samples.items()}

    def row(key: str, ref: str) -> list[str]:
        ratios = per_rep_ratios(samples[key], samples[ref])
        return [
            label(key),
            us2(us[key]),
            spread(samples[key], us2),
            ratio(us[key], us[ref]),
            spread(ratios, x2),
        ]

    for key in keys:
        ex.rows.append(row(key, "portalocker"))
    for key in rw_keys:
        rw.rows.append(row(key, "portalocker-sh" if PEERS[key].shared else "portalocker-ex"))
    ex.data = {key: {"us_per_cycle": us[key], "samples": samples[key]} for key in keys}
    rw.data = {key: {"us_per_cycle": us[key], "samples": samples[key]} for key in rw_keys}

    def peers_us(names: Sequence[str]) -> str:
        return ", ".join(f"{label(k)} {us[k]:.1f}" for k in names if k in us) + " µs"

    grex = us.get("grex")
    b.report.target(
        "uncontended acquire+release, PackLock (with owner record)",
        None if grex is None else grex / us["portalocker"],
        0.5,
        "{:.2f}x",
        against="portalocker.Lock",
        grex="-" if grex is None else f"{grex:.1f} µs ({spread(samples['grex'], us2)})",
        peers=peers_us(["portalocker", "fasteners", "filelock", "flock"]),
    )
    write, read = us.get("grex-write"), us.get("grex-read")
    b.report.target(
        "ManifestLock.write() / .read()",
        None if write is None else write / us["portalocker-ex"],
        0.5,
        "{:.2f}x",
        against="portalocker EXCLUSIVE (write)",
        grex="-" if write is None or read is None else f"{write:.1f} / {read:.1f} µs",
        peers=(
            f"portalocker EXCLUSIVE / SHARED {us['portalocker-ex']:.1f} / "
            f"{us['portalocker-sh']:.1f}; fasteners RW write / read {us['fasteners-w']:.1f} / "
            f"{us['fasteners-r']:.1f} µs"
        ),
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
        "Handoff latency: holder process releases -> blocked process has the lock",
        f"{b.s.handoff_trials} interleaved trials; t0 just before release() in the holder, "
        "t1 just after acquire() returned in the waiter (CLOCK_MONOTONIC is system-wide); "
        "release sent a random moment into the peer's polling period. 'timeout armed' waits "
        f"with timeout={MAX_WAIT:.0f}, 'cancel armed' with a cancel event that is never set",
        ["lock", "median ms", "p10 ms", "p90 ms", "max ms", "vs raw flock (median)"],
    )
    b.report.sections.append(sec)
    keys = b.keys(HANDOFF, sec)
    pool = b.workers(2)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for trial in range(b.s.handoff_trials):
        for key in rotated(keys, trial):
            samples[key].append(_handoff_once(b, pool, key))
    med = {key: median(values) for key, values in samples.items()}
    floor = med["flock"]
    for key, values in samples.items():
        sec.rows.append(
            [
                label(key),
                ms(med[key]),
                ms(pct(values, 0.1)),
                ms(pct(values, 0.9)),
                ms(max(values)),
                ratio(med[key], floor),
            ]
        )
        sec.data[key] = {"median": med[key], "p10": pct(values, 0.1), "p90": pct(values, 0.9)}
        sec.data[key] |= {"max": max(values), "samples": values}
    peers = f"raw flock {ms(floor)} ms (p10-p90 {spread(samples['flock'], ms)}); portalocker "
    peers += f"blocking {ms(med['portalocker-blocking'])} ms"
    for key, what, limit in [
        ("grex", "", 1.5),
        ("grex+timeout", ", timeout= armed", 2.0),
        ("grex+cancel", ", cancel= armed", 2.0),
    ]:
        got = samples.get(key)
        b.report.target(
            f"handoff: holder releases -> waiting process returns{what}",
            None if not got else med[key] / floor,
            limit,
            "{:.2f}x",
            against="raw flock",
            grex="-" if not got else f"{ms(med[key])} ms (p10-p90 {spread(got, ms)})",
            peers=peers,
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
    counts = b.s.process_counts
    sec = Section(
        "contention",
        "Cross-process contention: acquire, increment a shared counter, release",
        f"spawn processes released by one barrier, {b.s.contention_seconds} s each, "
        f"{b.s.contention_reps} interleaved repetition(s); cycles/s median (min-max) over "
        "repetitions, worst wait the worst of all; throughput against portalocker.lock "
        "(blocking), worst wait against raw flock. " + CAVEAT,
        [
            "lock",
            "procs",
            "cycles/s",
            "min-max",
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
    pool = b.workers(max(counts))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(k, n): [] for k in keys for n in counts}
    for rep in range(b.s.contention_reps):
        for n in counts:
            for key in rotated(keys, rep + n):
                runs[key, n].append(_contend_once(b, pool, key, n))
    summary: dict[tuple[str, int], dict[str, Any]] = {}
    for (key, n), results in runs.items():
        per = [c for r in results for c in r["per_process"]]
        rates = [r["cycles_per_s"] for r in results]
        summary[key, n] = {
            "cycles_per_s": median(rates),
            "cycles_per_s_each": rates,
            "median_wait": median([r["median_wait"] for r in results]),
            "worst_wait": max(r["worst_wait"] for r in results),
            "min_max": f"{min(per)}/{max(per)}",
            "count_ok": all(r["count_ok"] for r in results),
        }
    for n in counts:
        ref_tp = summary[("portalocker-blocking", n)]["cycles_per_s"]
        ref_worst = summary[("flock", n)]["worst_wait"]
        for key in keys:
            got = summary[key, n]
            each = got["cycles_per_s_each"]
            sec.rows.append(
                [
                    label(key),
                    str(n),
                    f"{got['cycles_per_s']:.0f}",
                    f"{min(each):.0f}-{max(each):.0f}",
                    ratio(got["cycles_per_s"], ref_tp),
                    ms(got["median_wait"]),
                    ms(got["worst_wait"]),
                    ratio(got["worst_wait"], ref_worst),
                    got["min_max"],
                    "ok" if got["count_ok"] else "VIOLATION",
                ]
            )
    sec.data = {f"{key}@{n}": value for (key, n), value in summary.items()}
    grex4 = summary.get(("grex", 4))
    grex8 = summary.get(("grex", 8))
    pl4 = summary.get(("portalocker-blocking", 4))
    fl4, fl8 = summary.get(("flock", 4)), summary.get(("flock", 8))
    refs = "-"
    if pl4 is not None and fl4 is not None:
        refs = f"portalocker blocking {pl4['cycles_per_s']:,.0f}; "
        refs += f"raw flock {fl4['cycles_per_s']:,.0f}"
    b.report.target(
        "4 processes, zero think time, cycles/s",
        None if grex4 is None or pl4 is None else grex4["cycles_per_s"] / pl4["cycles_per_s"],
        1.0,
        "{:.2f}x",
        at_least=True,
        against="portalocker blocking",
        grex="-" if grex4 is None else f"{grex4['cycles_per_s']:,.0f}",
        peers=refs,
    )
    b.report.target(
        "8 processes, worst wait",
        None if grex8 is None or fl8 is None else grex8["worst_wait"] / fl8["worst_wait"],
        1.0,
        "{:.2f}x",
        against="raw flock",
        grex="-" if grex8 is None else f"{ms(grex8['worst_wait'])} ms",
        peers="-" if fl8 is None else f"raw flock {ms(fl8['worst_wait'])} ms",
    )


def threads(b: Bench) -> None:
    n = 4
    sec = Section(
        "threads",
        f"Threads: {n} threads in one process, each with its own lock object on one path",
        f"{b.s.thread_seconds} s per run, {b.s.thread_reps} interleaved repetition(s), cycles/s "
        "median (min-max); an 'overlap' is a thread entering while another is inside, 'lost' "
        "the increments the shared counter is missing; min/max per thread shows fairness",
        [
            "lock",
            "cycles/s",
            "min-max",
            "vs portalocker.Lock",
            "vs raw flock",
            "min/max per thread",
            "overlaps",
            "lost",
            "verdict",
        ],
    )
    b.report.sections.append(sec)
    keys = b.keys([*EXCLUSIVE, "grex"], sec)
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    for rep in range(b.s.thread_reps):
        for key in rotated(keys, rep):
            results[key].append(_threads_run(b, key, n, b.s.thread_seconds))
    each = {key: [sum(r["cycles"]) / r["elapsed"] for r in rs] for key, rs in results.items()}
    rates = {key: median(values) for key, values in each.items()}
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
                f"{min(each[key]):.0f}-{max(each[key]):.0f}",
                ratio(rates[key], rates.get("portalocker")),
                ratio(rates[key], rates.get("flock")),
                f"{min(per)}/{max(per)}",
                str(overlaps),
                str(lost),
                verdict,
            ]
        )
        sec.data[key] = {"cycles_per_s": rates[key], "overlaps": overlaps, "lost": lost}
        sec.data[key] |= {"verdict": verdict, "errors": errors, "each": each[key]}
    grex, ref, floor = rates.get("grex"), rates.get("portalocker"), rates.get("flock")
    fairness = ""
    if grex is not None:
        per = [c for r in results["grex"] for c in r["cycles"]]
        fairness = f" (per thread {min(per)}/{max(per)})"
    b.report.target(
        f"{n} threads, one lock object each, one path, cycles/s",
        None if grex is None or ref is None else grex / ref,
        1.0,
        "{:.2f}x",
        at_least=True,
        against="portalocker.Lock",
        grex="-" if grex is None else f"{grex:,.0f}{fairness}",
        peers="-"
        if ref is None or floor is None
        else f"portalocker.Lock {ref:,.0f}; portalocker blocking "
        f"{rates.get('portalocker-blocking', math.nan):,.0f}; raw flock {floor:,.0f}",
    )


#: The locks the floors scenario also runs with the threads scenario's loop on one CPU.
PINNED = ("grex", "portalocker")


def _can_pin() -> bool:
    """Whether this machine can pin a process to one CPU, and has more than one."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1


def _threads_run(
    b: Bench, key: str, n: int, seconds: float, cpu: int | None = None
) -> dict[str, Any]:
    """One run of the threads scenario's loop in a bench worker (``cpu``: pinned to that CPU)."""
    pack = b.pack("threads", key)
    result: dict[str, Any] = b.workers(1).call(
        0,
        "threads",
        key,
        str(pack),
        counter=str(b.counter(pack)),
        n=n,
        seconds=seconds,
        cpu=cpu,
        timeout=seconds + MAX_WAIT + 10,
    )
    if result["hung"]:
        b.drop_workers()  # a thread is stuck in that worker for good
    return result


def _baton_once(b: Bench, n: int, before: int, after: int) -> float:
    """Hand-offs/s of one baton run in a bench worker; a failure is the run's failure."""
    seconds = b.s.floor_seconds
    got = b.workers(1).call(
        0, "baton", n, seconds, before=before, after=after, timeout=seconds + QUICK_CALL + 15
    )
    if got["hung"] or got["errors"]:
        if got["hung"]:
            b.drop_workers()  # its threads are stuck in that worker for good
        b.report.fail(f"floors: the baton failed: {got['hung']} hung, {got['errors']}")
    return float(got["handoffs"] / got["elapsed"])


def _flock_floor_once(b: Bench, n: int, gap: int) -> dict[str, Any]:
    """One run of ``n`` processes looping on raw flock with ``gap`` spin iterations between."""
    pack = b.pack("floors", "flock")
    lock, state = pack / "floor.lock", pack / "floor.state"
    state.write_bytes(bytes(mmap.PAGESIZE))  # the last holder's id (0: nobody yet)
    pool = b.workers(n)
    seconds = b.s.floor_seconds
    for i in range(n):
        pool.send(i, "flock_floor", str(lock), str(state), n=n, index=i, seconds=seconds, gap=gap)
    results = [pool.recv(i, seconds + QUICK_CALL + 10) for i in range(n)]
    cycles = sum(r["cycles"] for r in results)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "cycles_per_s": cycles / elapsed,
        "cross": sum(r["cross"] for r in results) / cycles,
        "per_process": [r["cycles"] for r in results],
    }


#: A variant of the hand-off floor: (holder's, waiter's) µs of work, None for the handoff
#: scenario's own worker commands (no loop, no loop timing), or HELPER: those commands with
#: the waiter blocking in a helper thread's flock, as an interruptible wait must.
HandoffWork = tuple[int, int] | str | None
HELPER = "helper"


def _handoff_work_once(
    b: Bench, pool: Workers, pack: str, variant: HandoffWork, loops: Callable[[int], int]
) -> tuple[float, float, float]:
    """One raw flock hand-off timed as ``_handoff_once`` times it, with work on either side.

    Returns the hand-off in seconds and the ns the waiter's and the holder's loops took
    (NaN where there was none).
    """
    key = "flock"
    pool.call(0, "hold", key, pack)
    if variant is None:
        pool.send(1, "wait", key, pack)
    elif isinstance(variant, str):  # HELPER
        pool.send(1, "wait_helper", key, pack)
    else:
        pool.send(1, "wait_work", key, pack, loops(variant[1]))
    pool.recv(1, QUICK_CALL, "note")
    time.sleep(SETTLE)  # as _handoff_once: raw flock has no polling period to randomise against
    holder_ns = math.nan
    if not isinstance(variant, tuple) or not variant[0]:
        released = pool.call(0, "release", key, pack)
    else:
        released, holder_ns = pool.call(0, "release_work", key, pack, loops(variant[0]))
    got = pool.recv(1, MAX_WAIT + 10)
    granted, waiter_ns = got if isinstance(variant, tuple) else (got, math.nan)
    if granted < released:
        b.report.fail("LOCK VIOLATION: raw flock granted the waiter before the holder let go")
    return float(granted - released), float(waiter_ns), float(holder_ns)


def _floor_handoff(b: Bench, loops: Callable[[int], int], per_us: float) -> None:
    """The floors' third table: raw flock hand-offs whose waiter (or holder) does some work."""
    trials, both = b.s.floor_handoff_trials, FLOOR_HANDOFF_BOTH
    variants: list[HandoffWork] = [
        None,
        HELPER,
        *((0, w) for w in FLOOR_HANDOFF_WORK),
        (both, both),
    ]
    sec = Section(
        "floors_handoff",
        "Floor, hand-off: raw flock with work after the wake",
        f"the handoff scenario's method, worker processes and commands, on raw flock: {trials} "
        "trials interleaved across the rows, after one discarded round; the holder takes the "
        "lock, the waiter blocks in flock(LOCK_EX), "
        f"{SETTLE * 1e3:.0f} ms later the holder notes t0 and unlocks; t1 when the waiter is "
        "done. Waiter W µs: it runs W µs (warm) of the calibrated pure-Python loop right "
        "after its flock returns, before t1 (what a library does after the grant), timing "
        "the loop with perf_counter_ns (CLOCK_MONOTONIC) on each side, t1 the second read. "
        "Holder W µs: the holder too runs the loop between t0 and its flock(LOCK_UN) (a "
        "library blanking its record before unlocking). The first row is the handoff "
        "scenario's own commands: t1 the first clock read after the wake, no loop; the "
        "second, the same with the waiter blocked in a helper thread's flock that wakes the "
        "caller through a bare lock and yields (what a wait with a timeout or a cancel "
        "event must do, since a blocking flock cannot be interrupted)",
        [
            "raw flock hand-off",
            "holder W µs",
            "waiter W µs",
            "loops",
            "median µs",
            "p90 µs",
            "µs vs work=0",
            "vs work=0",
        ],
    )
    b.report.sections.append(sec)
    pool = b.workers(2)
    pack = str(b.pack("floors", "handoff-flock"))
    took: dict[HandoffWork, list[float]] = {v: [] for v in variants}
    waiter: dict[HandoffWork, list[float]] = {v: [] for v in variants}
    holder: dict[HandoffWork, list[float]] = {v: [] for v in variants}
    for v in variants:  # the warm-up round: first calls, first opens
        _handoff_work_once(b, pool, pack, v, loops)
    for trial in range(trials):
        for v in rotated(variants, trial):
            seconds, waiter_ns, holder_ns = _handoff_work_once(b, pool, pack, v, loops)
            took[v].append(seconds)
            waiter[v].append(waiter_ns)
            holder[v].append(holder_ns)
    warm = {
        w: [float(ns) for ns in pool.call(1, "spin_ns", loops(w), FLOOR_WARM_TRIES)]
        for w in FLOOR_HANDOFF_WORK
    }

    def us1(seconds: float) -> str:
        return f"{seconds * 1e6:.1f}"

    med = {v: median(values) for v, values in took.items()}
    ref = med[0, 0]

    def row(first: list[str], got: float, p90: float) -> list[str]:
        return [*first, us1(got), us1(p90), f"{(got - ref) * 1e6:+.1f}", ratio(got, ref)]

    for v, values in took.items():
        if v is None:
            first = ["wake (the handoff scenario's commands)", "", "", ""]
        elif isinstance(v, str):  # HELPER
            first = ["wake a helper thread, which wakes the caller", "", "", ""]
        elif not v[0]:
            first = ["wake, loop", "", str(v[1]), str(loops(v[1]))]
        else:
            first = ["loop, unlock | wake, loop", str(v[0]), str(v[1])]
            first.append(f"{loops(v[0])} | {loops(v[1])}")
        sec.rows.append(row(first, med[v], pct(values, 0.9)))
        name = f"holder{v[0]}_waiter{v[1]}" if isinstance(v, tuple) else v or "commands"
        sec.data[name] = {"median": med[v], "p90": pct(values, 0.9), "samples": values}
        sec.data[name] |= {"waiter_loop_ns": waiter[v], "holder_loop_ns": holder[v]}
    sec.data["warm_loop_ns"] = {str(w): values for w, values in warm.items()}
    handoff_sec = b.report.section("handoff")
    if handoff_sec is None or "flock" not in handoff_sec.data:
        sec.notes.append(
            "the handoff scenario did not run: run `--only handoff floors` to see grex_locks' "
            "and raw flock's hand-off beside these floors"
        )
    else:
        for key in ["grex", "grex+timeout", "grex+cancel", "flock"]:
            got = handoff_sec.data.get(key)
            if got is not None:
                what = f"same run, handoff scenario: {label(key)}"
                sec.rows.append(row([what, "", "", ""], got["median"], got["p90"]))
        sec.notes.append(
            f"the handoff scenario's rows: {b.s.handoff_trials} trials, interleaved with the "
            "other libraries' (its raw flock row runs the same commands as this table's first)"
        )
    cold = []
    for w in FLOOR_HANDOFF_WORK:
        after, before = median(waiter[0, w]) / 1e3, median(warm[w]) / 1e3
        cold.append(f"W={w}: {before:.2f} -> {after:.2f} µs ({after / before:.1f}x, ")
        cold[-1] += f"{after - before:+.1f} µs)"
    after_both = median(waiter[both, both]) / 1e3
    held = median(holder[both, both]) / 1e3
    sec.notes.append(
        "the cold-path penalty: the waiter's loop (with its two clock reads), median warm "
        f"({FLOOR_WARM_TRIES} back-to-back timings in the waiter process) -> right after the "
        f"wake (over the trials): {'; '.join(cold)}. Two-sided row: the waiter's loop "
        f"{after_both:.2f} µs, the holder's {held:.2f} µs (its loop runs right after the "
        "release command wakes it from its pipe)"
    )
    sec.notes.append(
        f"W=0 still takes the clock twice and calls an empty loop after the wake; {per_us:.1f} "
        "loop iterations per µs, as above; 'vs work=0' against the W=0 row's median"
    )


def _span(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def _each_us(rate: float) -> str:
    return f"{1e6 / rate:.2f}" if rate else "-"


def _same_run_row(
    scenario: str,
    key: str,
    rate: float,
    each: Sequence[float],
    floor: float,
    *,
    extra: Sequence[str] = (),
) -> list[str]:
    """Another scenario's rate (cycles/s) for ``key``, as a row beside a floors table."""
    return [
        f"same run, {scenario} scenario: {label(key)}",
        "",
        "",
        f"{rate:,.0f}",
        _span(each),
        _each_us(rate),
        *extra,
        ratio(rate, floor),
    ]


def floors(b: Bench) -> None:
    """The physical floors under issue 11's two missed throughput targets, same run.

    Threads: a baton among bare ``_thread`` locks, i.e. first-come-first-served hand-off
    between threads of one interpreter, with W µs of the thread's own work per turn.
    Processes: raw flock re-taken after G µs of work between unlock and lock (what a library
    spends there), with the share of cycles where another process got the lock.
    Hand-off: the handoff scenario's raw flock hand-off with W µs of work right after the
    waiter's wake (and once on the holder's side too), and what that work costs there
    against warm: the cold-path penalty any library's code after the grant pays.
    """
    n = FLOOR_N
    reps, seconds = b.s.floor_reps, b.s.floor_seconds
    per = f"{seconds} s per run, {reps} interleaved repetition(s); median (min-max) over them"
    th = Section(
        "floors_threads",
        f"Floor, threads: a baton passed round-robin among {n} threads through bare _thread locks",
        f"{per}; in one bench worker process. Thread i blocks on its own lock (acquire with a "
        f"{QUICK_CALL:.0f} s timeout), then releases thread i+1's: one hand-off. 'after': W µs "
        "of pure-Python busy work after waking the next, before blocking again (a releasing "
        "thread returning to its caller and coming back for the lock). 'before': W µs between "
        "being woken and waking the next (a holder's work inside its turn)",
        ["baton", "W µs", "loops", "hand-offs/s", "min-max", "µs each", "vs W=0"],
    )
    pr = Section(
        "floors_processes",
        f"Floor, processes: {n} processes re-taking one raw flock with G µs between unlock "
        "and lock",
        f"{per}; bench worker processes released by one barrier, each looping flock(LOCK_EX) "
        "(blocking), read the last holder's id from a shared mmap'd byte (write its own if it "
        "differs), flock(LOCK_UN), G µs of pure-Python busy work (the clock read every 64th "
        "cycle); cycles/s over all processes; 'cross-process' the share of cycles in which "
        "the lock went to another process than the one that held it last",
        [
            "loop",
            "G µs",
            "loops",
            "cycles/s",
            "min-max",
            "1/rate µs",
            "cross-process",
            "min/max per proc",
            "vs G=0",
        ],
    )
    b.report.sections += [th, pr]
    tries, iterations = SPIN_CALIBRATION
    cal = b.workers(n).call(0, "spin_rate", iterations, tries)
    per_us = float(cal["per_us"])

    def loops(us: int) -> int:
        return round(us * per_us)

    baton = [("after", w) for w in BATON_WORK] + [("before", w) for w in BATON_WORK if w]
    handoffs: dict[tuple[str, int], list[float]] = {v: [] for v in baton}
    runs: dict[int, list[dict[str, Any]]] = {g: [] for g in FLOCK_GAPS}
    one_cpu: dict[str, list[float]] = {key: [] for key in b.keys(PINNED, th)} if _can_pin() else {}
    for rep in range(reps):
        order = ["threads", "processes"] if rep % 2 == 0 else ["processes", "threads"]
        for kind in order:
            if kind == "threads":
                for where, w in rotated(baton, rep):
                    before, after = (loops(w), 0) if where == "before" else (0, loops(w))
                    handoffs[where, w].append(_baton_once(b, n, before, after))
                for key in rotated(list(one_cpu), rep):
                    pinned_run = _threads_run(b, key, n, seconds, cpu=0)
                    if pinned_run["hung"]:
                        b.report.fail(f"floors: {label(key)} hung in the threads loop")
                    one_cpu[key].append(sum(pinned_run["cycles"]) / pinned_run["elapsed"])
            else:
                for gap in rotated(FLOCK_GAPS, rep):
                    runs[gap].append(_flock_floor_once(b, n, loops(gap)))
    _floor_handoff(b, loops, per_us)
    again = float(b.workers(n).call(0, "spin_rate", iterations, tries)["per_us"])

    span, each_us = _span, _each_us
    drift = abs(again / per_us - 1) > 0.2
    rate = {v: median(values) for v, values in handoffs.items()}
    floor0 = rate["after", 0]
    for (where, w), values in handoffs.items():
        what = "wake next, then W µs" if where == "after" else "W µs, then wake next"
        th.rows.append(
            [
                what if w else "wake next (no work)",
                str(w),
                str(loops(w)),
                f"{rate[where, w]:,.0f}",
                span(values),
                each_us(rate[where, w]),
                ratio(rate[where, w], floor0),
            ]
        )
    th.data = {
        f"{where}@{w}": {"handoffs_per_s": rate[where, w], "each": values}
        for (where, w), values in handoffs.items()
    }
    threads_sec = b.report.section("threads")
    if threads_sec is None or not threads_sec.data:
        th.notes.append(
            "the threads scenario did not run: run `--only threads floors` to see grex_locks' "
            "and portalocker.Lock's 4-thread cycles/s beside these floors"
        )
    else:
        for key in ["grex", "portalocker", "flock"]:
            got = threads_sec.data.get(key)
            if got is None:
                continue
            th.rows.append(_same_run_row("threads", key, got["cycles_per_s"], got["each"], floor0))
        th.notes.append(
            "the threads scenario's rows are cycles/s of acquire + counter increment (pread + "
            "pwrite) + release, each of its 4 threads with its own lock object on one path"
        )
    for key, values in one_cpu.items():
        pinned = median(values)
        row = [f"threads scenario on one CPU: {label(key)}", "", "", f"{pinned:,.0f}"]
        th.rows.append([*row, _span(values), _each_us(pinned), ratio(pinned, floor0)])
    if one_cpu:
        th.notes.append(
            "'on one CPU': the threads scenario's loop with its worker process pinned to CPU 0, "
            "so that no hand-off between threads crosses CPUs: what a wake-up on another CPU "
            "(and its cold caches) costs a first-come-first-served lock"
        )
    th.notes.append(
        f"busy work: {per_us:.1f} loop iterations per µs (`for _ in range(k): pass`, the "
        f"fastest of {tries} timings of {iterations:,} iterations in a bench worker; median "
        f"{cal['median_per_us']:.1f}/µs) at the start, {again:.1f}/µs re-measured at the end"
        + (" (a drift: the CPU's speed changed during the runs)" if drift else "")
        + "; W=0 still runs an empty loop and the stop check"
    )

    summary: dict[int, dict[str, Any]] = {}
    for gap, results in runs.items():
        rates = [r["cycles_per_s"] for r in results]
        per_proc = [c for r in results for c in r["per_process"]]
        summary[gap] = {
            "cycles_per_s": median(rates),
            "cycles_per_s_each": rates,
            "cross": median([r["cross"] for r in results]),
            "cross_each": [r["cross"] for r in results],
            "min_max": f"{min(per_proc)}/{max(per_proc)}",
        }
    gap0 = summary[0]["cycles_per_s"]
    for gap, got in summary.items():
        pr.rows.append(
            [
                "flock, note holder, unlock, G µs" if gap else "flock, note holder, unlock",
                str(gap),
                str(loops(gap)),
                f"{got['cycles_per_s']:,.0f}",
                span(got["cycles_per_s_each"]),
                each_us(got["cycles_per_s"]),
                f"{got['cross']:.1%}",
                got["min_max"],
                ratio(got["cycles_per_s"], gap0),
            ]
        )
    pr.data = {f"gap@{gap}": got for gap, got in summary.items()}
    pr.data["spin_per_us"] = cal | {"at_end": again}
    contention_sec = b.report.section("contention")
    if contention_sec is None or f"grex@{n}" not in contention_sec.data:
        pr.notes.append(
            "the contention scenario did not run: run `--only contention floors` to see "
            f"grex_locks' and the peers' {n}-process cycles/s beside these floors"
        )
    else:
        for key in ["grex", "portalocker-blocking", "flock"]:
            got = contention_sec.data.get(f"{key}@{n}")
            if got is None:
                continue
            cycles, each = got["cycles_per_s"], got["cycles_per_s_each"]
            extra = ["", got["min_max"]]
            pr.rows.append(_same_run_row("contention", key, cycles, each, gap0, extra=extra))
        pr.notes.append(
            "the contention scenario's rows hold the lock across a counter increment (pread + "
            "pwrite) and take the clock every cycle; the floor loop holds it for a byte's read"
        )
    pr.notes.append(
        "G=0 still runs `cycles += 1`, an empty loop and a bit test between unlock and lock; "
        f"{per_us:.1f} loop iterations per µs, as above; '1/rate' is not one cycle's latency: "
        "the processes' gaps overlap on the CPUs"
    )


def scheduler_busy(b: Bench) -> None:
    n = BUSY_SLOTS
    sec = Section(
        "scheduler_busy",
        f"Scheduler({n}, slots_dir=d) with all {n} slots held by another process",
        f"a fresh process runs {b.s.busy_tries} try_acquire() calls (each should raise LockBusy; "
        f"the first, which opens the slot files, shown apart), then {b.s.busy_rounds} round(s) "
        f"of {n} threads calling acquire(timeout={BUSY_TIMEOUT}) at once (each should raise "
        "LockTimeout); grex_locks' helper threads (named grex-locks-*, or else every thread "
        "beyond the callers; not the slow-wait log's monitor, one per process whatever the "
        "waits) counted every 2 ms with threading.enumerate(); 'left' is what is "
        "still alive 0.5 s after a round, and after the holder let go",
        ["figure", "median", "p10-p90", "max", "outcomes / detail"],
    )
    b.report.sections.append(sec)
    figures = [
        (f"Scheduler({n}, slots_dir), all slots held elsewhere: try_acquire()", 0.2, "{:.3f} ms"),
        (f"same, {n} threads acquire(timeout={BUSY_TIMEOUT}): slowest return", 1.05, "{:.3f} s"),
        (f"same: grex_locks helper threads at peak (slots: {n})", float(n), "{:.0f}"),
    ]
    if not grex_has("Scheduler", "LockBusy", "LockTimeout", "set_tier_check"):
        sec.notes.append("grex_locks Scheduler: skipped (not available)")
        for figure, limit, fmt in figures:
            b.report.target(figure, None, limit, fmt)
        return
    slots = str(b.root / "busy-slots")
    holder, prober = Workers(1), Workers(1)
    try:
        holder.call(0, "hold_slots", slots, n)
        tried = prober.call(0, "busy_try", slots, n, b.s.busy_tries, timeout=MAX_WAIT + 10)
        rounds = [
            prober.call(0, "busy_wait", slots, n, n, BUSY_TIMEOUT, timeout=MAX_WAIT + 10)
            for _ in range(b.s.busy_rounds)
        ]
        holder.call(0, "release_kept")
        drained = prober.call(0, "helpers_drain", 5.0, timeout=QUICK_CALL)
    finally:
        holder.close()
        prober.close()
    first, rest = tried["seconds"][0], tried["seconds"][1:] or tried["seconds"]
    took = [t for r in rounds for t in r["took"]]
    slowest = [max(r["took"]) for r in rounds]
    # Helpers by name, or every thread beyond the callers if the library names them otherwise.
    peaks = [max(r["helpers_peak"], r["threads_peak"] - r["threads_before"] - n) for r in rounds]
    outcomes: Counter[str] = Counter()
    for r in rounds:
        outcomes.update(r["outcomes"])
    left = [r["helpers_after_0_5s"] for r in rounds]
    busiest = max(rounds, key=lambda r: r["helpers_peak"])
    sec.rows += [
        ["try_acquire(), first call", ms(first), "", "", "ms; opens the slot files"],
        [
            "try_acquire()",
            ms(median(rest)),
            spread(rest, ms),
            ms(max(rest)),
            "ms; " + ", ".join(f"{k} {v}" for k, v in sorted(tried["outcomes"].items())),
        ],
        [
            f"acquire(timeout={BUSY_TIMEOUT}), per thread",
            f"{median(took):.3f}",
            spread(took, lambda s: f"{s:.3f}"),
            f"{max(took):.3f}",
            "s; " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        ],
        [
            "  slowest thread of each round",
            f"{median(slowest):.3f}",
            "",
            f"{max(slowest):.3f}",
            "s; rounds: " + ", ".join(f"{s:.3f}" for s in slowest),
        ],
        [
            "  helper threads at peak",
            f"{median(peaks):.0f}",
            "",
            str(max(peaks)),
            "per round: "
            + ", ".join(map(str, peaks))
            + "; busiest: "
            + ", ".join(f"{k} {v}" for k, v in sorted(busiest["helpers_peak_names"].items())),
        ],
        [
            "  threads in the process at peak",
            f"{median([r['threads_peak'] for r in rounds]):.0f}",
            "",
            str(max(r["threads_peak"] for r in rounds)),
            f"{n} callers + main + helpers",
        ],
        [
            "  helper threads left 0.5 s after each round",
            "",
            "",
            str(max(left)),
            "per round: " + ", ".join(map(str, left)),
        ],
        [
            "  helper threads left after the holder let go",
            "",
            "",
            str(sum(drained["left"].values())),
            f"after {drained['seconds']:.2f} s: "
            + (", ".join(f"{k} {v}" for k, v in drained["left"].items()) or "none"),
        ],
    ]
    sec.data = {"try_acquire": tried, "rounds": rounds, "drained": drained}
    if tried["outcomes"].get("acquired") or outcomes.get("acquired"):
        b.report.fail(f"LOCK VIOLATION: a permit was granted while all {n} slots were held")
    others = set(tried["outcomes"]) - {"LockBusy"} | set(outcomes) - {"LockTimeout"}
    if others:
        b.report.fail(f"busy scheduler: unexpected outcomes {sorted(others)}")
    if any(r["hung"] for r in rounds):
        b.report.fail("busy scheduler: a thread's acquire(timeout=...) never returned")
    if len(set(left)) > 1 and left[-1] > left[0]:
        sec.notes.append(f"helper threads left behind grow round after round: {left}")
    (f_try, l_try, fmt_try), (f_wait, l_wait, fmt_wait), (f_help, l_help, fmt_help) = figures
    b.report.target(
        f_try,
        median(rest) * 1e3,
        l_try,
        fmt_try,
        grex=f"{ms(median(rest))} ms (p10-p90 {spread(rest, ms)})",
    )
    b.report.target(
        f_wait,
        max(took),
        l_wait,
        fmt_wait,
        grex=f"slowest of {len(took)}: {max(took):.3f} s (median {median(took):.3f})",
    )
    b.report.target(
        f_help,
        max(peaks),
        l_help,
        fmt_help,
        grex=f"{max(peaks)} helper threads ({len(left)} round(s), {max(left)} left after one)",
    )


def timeouts(b: Bench) -> None:
    sec = Section(
        "timeouts",
        "Timeout overshoot and cancel latency while another process holds the lock",
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
        f"PackLock acquire(timeout={b.s.timeout}) overshoot, median (earlier issue)",
        None if not grex_over else median(grex_over) * 1e3,
        2.0,
        "{:.2f} ms",
    )
    b.report.target(
        "PackLock cancel latency, median (earlier issue)",
        None if not grex_late else median(grex_late) * 1e3,
        5.0,
        "{:.2f} ms",
    )


def scheduler(b: Bench) -> None:
    sec = Section(
        "scheduler",
        "Scheduler permit acquire+release, uncontended, one process",
        f"µs per cycle, median and p10-p90 of {b.s.uncontended_reps} interleaved repetitions of "
        f"{b.s.uncontended_cycles} cycles; in-process permits against "
        "threading.BoundedSemaphore, slots_dir permits (a slot file with an owner record) "
        "against a PackLock",
        ["what", "µs/cycle", "p10-p90", "vs reference"],
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

    samples = interleaved_us(
        {
            "semaphore": sem_cycle,
            "local": permit(local),
            "pack": peer_cycle(pack),
            "slots": permit(slots),
        },
        b.s.uncontended_reps,
        b.s.uncontended_cycles,
    )
    pack.close()
    us = {key: median(values) for key, values in samples.items()}
    for what, key, ref in [
        ("threading.BoundedSemaphore(4)", "semaphore", "semaphore"),
        ("Scheduler(4)", "local", "semaphore"),
        ("grex_locks PackLock", "pack", "pack"),
        ("Scheduler(4, slots_dir=...)", "slots", "pack"),
    ]:
        sec.rows.append([what, us2(us[key]), spread(samples[key], us2), ratio(us[key], us[ref])])
    sec.data = us


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
        f"diagnose() on one held lock; scan() over {b.s.scan_packs:,} pack locks",
        f"{held_n} held by a live process, {stale_n} left stale by a SIGKILLed holder; medians "
        f"of {b.s.diagnose_calls} back-to-back diagnose() calls, of 5 after 0.1 s idle, and of "
        f"{b.s.scan_reps} scan() calls; reference: "
        "`lslocks --json` (the whole kernel lock table, paths resolved), same holders",
        ["what", "median ms", "vs lslocks --json", "result"],
    )
    b.report.sections.append(sec)
    scan_goal = f"scan() of {b.s.scan_packs:,} locks (earlier issue: 1 s per 10,000)"
    scan_limit = b.s.scan_packs / 10_000
    if not grex_has("diagnose", "scan", "PackLock", "set_tier_check"):
        sec.notes.append("grex_locks diagnose()/scan(): skipped (not available)")
        b.report.target(scan_goal, None, scan_limit, "{:.3f} s")
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
    b.report.target(
        scan_goal, scan_s, scan_limit, "{:.3f} s", peers=f"lslocks --json {ms(lslocks_s)} ms"
    )


def many_packs(b: Bench) -> None:
    n = b.s.many_packs
    sec = Section(
        "many_packs",
        f"{n:,} distinct packs acquired and released in turn, in one fresh process",
        "each pack a new PackLock (its directory created by the constructor), alternating in "
        "10 chunks with the reference: mkdir + open + flock + unlock + close on fresh packs; "
        "descriptors counted in /proc/self/fd, RSS from /proc/self/statm, peak from ru_maxrss",
        ["figure", "value", "target"],
    )
    b.report.sections.append(sec)
    goal = f"after {n:,} distinct packs (earlier issue):"
    if not grex_has("PackLock"):
        sec.notes.append("grex_locks PackLock: skipped (not available)")
        b.report.target(f"{goal} registry size", None, 0, "{}")
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
    if registry is not None:  # read from a private module; absent once the core is rewritten
        b.report.target(f"{goal} registry size", registry, 0, "{}")
    fds = got["fds_after"] - got["fds_before"]
    b.report.target(f"{goal} descriptors left open", fds, 0, "{:+d}")
    b.report.target(f"{goal} peak RSS growth", got["peak_rss_growth_mb"], 10.0, "{:.1f} MB")


#: In the order they run; issue 11's figures first.
SCENARIOS: list[Callable[[Bench], None]] = [
    uncontended,
    handoff,
    contention,
    threads,
    floors,
    scheduler_busy,
    timeouts,
    scheduler,
    diagnostics,
    many_packs,
]
