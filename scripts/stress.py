"""Chaos run: worker processes hammer grex's locks while a killer shoots at them.

Usage::

    python scripts/stress.py [--duration S] [--workers N] [--seed N] [--quick]

N worker processes (started with ``spawn`` and ``fork`` at random), each with
a few threads, loop over random legal chains of the locks (see
``stress_worker.py``); while holding, they fork children that do random
things to the inherited holds, run ``fork`` process pools whose tasks take
locks, and hand held descriptors to child programs as ``grex-locks run``
does (see ``stress_forks.py``). Meanwhile this process, the coordinator,
SIGKILLs, SIGSTOPs and SIGCONTs random workers — whatever they are doing:
waiting, holding, forking, appending — and restarts the killed ones.
Invariants, each a hard failure (see ``stress_audit.py``):

* mutual exclusion, from the O_APPEND audit log of bracketed lock lines —
  also against a child program that inherited a killed holder's lock;
* fork: a forked child (or a fork pool) never releases its parent's lock (a
  new open file description must not get it while the parent is inside) nor
  changes its parent's owner record, and never fails on leaving an inherited
  hold; at every sample the record of each lock a live process holds names
  that process and thread;
* nothing lost: every acknowledged manifest append is present and whole;
* no deadlock: every wait has a deadline, and a wait past it is a failure
  (reported with a dump of ``scan()``); a thread that stops reporting is too;
* diagnostics are exact (``stress_exact.py``): at every sample each lock's
  ``scan()`` or ``diagnose()`` answer must be what the audit says — HELD
  naming the holder's pid and thread, HELD shared with every reader, FREE or
  STALE_RECORD, or ORPHANED with the child that inherited it — outside the
  windows the audit brackets. Every miss is printed with its sample.

It prints totals (operations, kills, stops, forks, pools, violations by kind,
exactness per state, lock kind and method) and exits 1 on any violation or
exactness miss.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import select
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import ForkContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stress_audit import AuditLog, Diagnostics, check_manifest, is_dead, kernel_says_holds
from stress_exact import EXPECTED_STATES, Tally, during, expectations, judge
from stress_forks import record_problem
from stress_worker import (
    MAX_THREADS,
    N_SLOTS,
    WAITING,
    Layout,
    LockSet,
    Plan,
    lock_kind,
    worker_main,
)

START_METHODS = ("spawn", "fork")
#: Violations and exactness misses printed as they happen; the rest are only counted.
MAX_PRINTED = 100
MAX_MISSES_PRINTED = 500
#: Which invariant a violation breaks, told by its words (the first match wins).
KINDS = (
    ("fork-release", ("inherited hold released",)),
    ("record", ("record of a live holder",)),
    ("fork", ("fork:",)),
    ("error", ("error: ",)),
    ("exclusion", ("mutual exclusion", "entered twice", "exit without", "took over", "still held")),
    ("lost", ("manifest record",)),
    ("deadlock", ("deadline", "no progress", "did not stop")),
    ("diagnostics", ("scan()",)),
    ("kernel", ("kernel shows",)),
)


@dataclass
class Slot:
    """One worker position; a killed worker is replaced by a new generation."""

    index: int
    gen: int = 0
    wid: str = ""
    process: BaseProcess | None = None
    pid: int = 0
    start_time: float = 0.0
    killed: bool = False
    stopped_until: float | None = None
    last_seen: dict[int, float] = field(default_factory=dict)


class Run:
    """The coordinator: starts workers, shoots at them, and checks every invariant."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.layout = Layout(root)
        for sub in ("slots", "ws", "state", "dumps", "packs", "repos"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.layout.audit.touch()
        self.locks = LockSet(self.layout)
        self.paths = self.locks.paths()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.layout.socket))
        self.sock.setblocking(False)
        self.audit_fd = os.open(self.layout.audit, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.audit = AuditLog(self.layout.audit, slots=tuple(f"s{i}" for i in range(N_SLOTS)))
        self.diag = Diagnostics(root, self.paths)
        self.tally = Tally()
        self.totals: Counter[str] = Counter()
        self.violations: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.acked: set[tuple[str, int]] = set()
        self.dead: dict[int, float] = {}
        self.samples = 0
        self.slots = [Slot(i) for i in range(args.workers)]
        self.contexts: dict[str, ForkContext | SpawnContext] = {
            "fork": multiprocessing.get_context("fork"),
            "spawn": multiprocessing.get_context("spawn"),
        }

    def log(self, line: str) -> None:
        os.write(self.audit_fd, (line + "\n").encode())

    # -- workers ---------------------------------------------------------------

    def start(self, slot: Slot) -> None:
        slot.gen += 1
        slot.wid = f"w{slot.index}.{slot.gen}"
        self.layout.state(slot.wid).write_bytes(b"i" * MAX_THREADS)
        method = self.rng.choice(START_METHODS)
        args = self.args
        forks = args.sabotage in ("fork", "record")
        plan = Plan(
            self.layout,
            self.locks,
            slot.wid,
            args.seed,
            args.threads,
            args.patience,
            args.dwell,
            args.sabotage,
            fork_share=0.5 if forks else args.fork_share,
            pool_share=args.pool_share,
            inherit_share=args.inherit_share,
        )
        # Not daemonic: a worker runs fork pools. Killed in run()'s finally if need be.
        process = self.contexts[method].Process(target=worker_main, args=(plan,), daemon=False)
        process.start()
        assert process.pid is not None
        slot.process, slot.pid, slot.killed, slot.stopped_until = process, process.pid, False, None
        try:
            slot.start_time = psutil.Process(process.pid).create_time()
        except psutil.Error:
            slot.start_time = 0.0
        now = time.monotonic()
        slot.last_seen = dict.fromkeys(range(args.threads), now)
        self.totals[f"started by {method}"] += 1

    def fail(self, text: str) -> None:
        self.violations.append(text)
        kind = next((k for k, words in KINDS if any(w in text for w in words)), "other")
        where = re.search(r"broken on (\w+):|flock of \S+ on (\w+)", text)
        self.kinds[f"{kind} on {where[1] or where[2]}" if where else kind] += 1
        if len(self.violations) <= MAX_PRINTED:
            print(f"VIOLATION: {text}", flush=True)

    def reap(self, restart: bool) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or process.exitcode is None:
                continue
            self.dead[slot.pid] = slot.start_time
            self.log(f"D {slot.wid}")
            if not slot.killed and process.exitcode != 0:
                self.fail(f"worker {slot.wid} exited with status {process.exitcode} unbidden")
            slot.process = None
            if restart:
                self.start(slot)

    # -- messages ----------------------------------------------------------------

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            self.handle(data.decode("utf-8", "replace").split(" ", 4))

    def handle(self, words: list[str]) -> None:
        kind, wid = words[0], words[1]
        slot = next((s for s in self.slots if s.wid == wid), None)
        if kind == "op":
            self.totals["operations"] += 1
            self.totals[words[3]] += 1
            self.totals["waits"] += int(words[4])
            if slot is not None:
                slot.last_seen[int(words[2])] = time.monotonic()
        elif kind == "ack":
            self.acked.add((wid, int(words[2])))
        elif kind == "bad":
            self.fail(f"{wid} thread {words[2]}: {' '.join(words[3:])}")
            if words[3].startswith("deadline"):
                print(f"scan() at the deadline:\n{self.diag.dump()}", flush=True)
        elif kind == "bye" and (words[2] != "0" or words[3] != "0"):
            self.fail(
                f"worker {wid} ended with registry_size()={words[2]}, stuck threads {words[3]}"
            )
        elif kind == "fork":
            self.totals["forks"] += 1
            self.totals[f"fork {words[2]}"] += 1
        elif kind == "pool":
            self.totals["pools"] += 1
            self.totals["pool tasks"] += int(words[2])
            self.totals["pool tasks ok"] += int(words[3])
            self.totals["pool processes"] += int(words[4])
        elif kind == "inherit":
            self.totals["inheritors"] += 1
        elif kind == "reuse":
            self.totals["descriptor reuses"] += 1

    # -- chaos -------------------------------------------------------------------

    def shoot(self, now: float) -> None:
        """One random act of violence: SIGKILL or SIGSTOP a random live worker."""
        live = [s for s in self.slots if s.process is not None and not s.killed]
        if not live:
            return
        self.audit.poll()
        handing = [s for s in live if self.audit.live_inheritance(s.wid)]
        kill = self.rng.random() < self.args.kill_share
        if kill and handing and self.rng.random() < 0.5:
            # Killing a worker whose child program holds its lock leaves it ORPHANED.
            slot = self.rng.choice(handing)
            self.totals["kills while a child held its lock"] += 1
        else:
            slot = self.rng.choice(live)
        holding = self.audit.holding(slot.wid)
        try:
            waiting = WAITING in self.layout.state(slot.wid).read_bytes()
        except OSError:
            waiting = False
        if kill:
            # Logged before the signal is sent, so the kernel's release of the
            # victim's locks always comes after this line in the audit log.
            self.log(f"C kill {slot.wid}")
            os.kill(slot.pid, signal.SIGKILL)
            slot.killed, slot.stopped_until = True, None
            what = "kills"
        elif slot.stopped_until is None:
            os.kill(slot.pid, signal.SIGSTOP)
            slot.stopped_until = now + self.rng.uniform(0.05, 0.3)
            what = "stops"
        else:
            return
        self.totals[what] += 1
        self.totals[f"{what} while holding"] += holding
        self.totals[f"{what} while waiting"] += waiting

    def resume_due(self, now: float, everyone: bool = False) -> None:
        for slot in self.slots:
            due = slot.stopped_until
            if due is not None and (everyone or due <= now) and slot.process is not None:
                os.kill(slot.pid, signal.SIGCONT)
                slot.stopped_until = None

    def watchdog(self, now: float) -> None:
        limit = self.args.patience + 30.0
        for slot in self.slots:
            if slot.process is None or slot.killed:
                continue
            stalled = [t for t, seen in slot.last_seen.items() if now - seen > limit]
            if stalled:
                os.kill(slot.pid, signal.SIGUSR1)
                self.fail(
                    f"worker {slot.wid} threads {stalled} made no progress for {limit:.0f} s "
                    f"(stacks in {self.layout.dump(slot.wid)}); scan():\n{self.diag.dump()}"
                )
                slot.last_seen = dict.fromkeys(slot.last_seen, now)

    def confirm_deaths(self) -> None:
        """Log ``D``/``K`` for killed processes and orphaned child programs now seen dead."""
        self.audit.poll()
        for wid, pid, start in self.audit.undead():
            if is_dead(pid, start):
                self.log(f"D {wid}")
        for inheritance in list(self.audit.inherits.values()):
            if (
                inheritance.pid
                and self.audit.is_killed(inheritance.wid)
                and is_dead(inheritance.pid, 0)
            ):
                self.log(f"K {inheritance.wid} {inheritance.lock} {inheritance.pid}")

    # -- diagnostics ---------------------------------------------------------------

    def check_diagnostics(self) -> None:
        """One sample: every lock diagnosed, each diagnosis judged against the audit.

        Samples alternate: one ``scan()`` of the run's tree (a window around
        the whole scan), then one ``diagnose()`` per lock (a window around each).
        """
        self.confirm_deaths()
        self.samples += 1
        names = sorted(self.paths)
        if self.samples % 2:
            self._sample("scan", names, self.diag.snapshot)
            return
        self.diag.scans += 1
        diagnose = self.diag.diagnose
        for name in names:
            path = self.paths[name]

            def one(path: Path = path) -> list[Any]:
                return [diagnose(path)] if diagnose is not None else []

            self._sample("diagnose", [name], one)

    def _sample(self, method: str, names: list[str], diagnose: Callable[[], list[Any]]) -> None:
        """Expectations for ``names``, their diagnoses, the lines written meanwhile; then judge."""
        self.audit.poll()
        self.audit.clear_touched()
        expected = expectations(self.audit, names)
        held = {k: v for k, v in self.audit.live_holds().items() if k in names}
        dead = dict(self.dead)
        diagnoses = diagnose()
        records = {
            lock: record_problem(self.paths[lock], e.pid, e.thread)
            for lock, e in expected.items()
            if e.state == "held"
        }
        kernel = {
            (lock, wid): kernel_says_holds(pid, self.paths[lock])
            for lock, holders in held.items()
            for wid, _tid in holders
            if (pid := self.audit.pid(wid)) is not None
        }
        self.audit.poll()
        touched = {lock: list(lines) for lock, lines in self.audit.touched.items()}
        held = {lock: h for lock, h in held.items() if lock not in touched}
        kernel = {key: value for key, value in kernel.items() if key[0] in held}
        for problem in self.diag.judge(diagnoses, held, kernel, dead):
            self.fail(problem)
        by_path = {Path(getattr(d, "path", "")): d for d in diagnoses}
        unknown_ok = self._forking_children(diagnoses)
        for lock in names:
            expectation = during(expected[lock], touched.get(lock, []), self.audit)
            wrong = records.get(lock)
            if wrong is not None and expectation.state == "held":
                self.fail(
                    f"record of a live holder changed: {lock} at sample {self.samples}: {wrong}"
                )
            diagnosis = by_path.get(self.paths[lock])
            verdict, why = judge(expectation, diagnosis, unknown_ok)
            miss = self.tally.add(
                self.samples,
                method=method,
                kind=lock_kind(lock),
                expectation=expectation,
                diagnosis=diagnosis,
                verdict=verdict,
                why=why,
            )
            if miss is not None and len(self.tally.misses) <= MAX_MISSES_PRINTED:
                print(miss, flush=True)

    def _forking_children(self, diagnoses: list[Any]) -> set[int]:
        """Holders the log does not know whose parent is one of ours (children just forked)."""
        known = {pid for pid, _ in self.audit.procs.values()}
        known |= {i.pid for i in self.audit.inherits.values()}
        found = set()
        for diagnosis in diagnoses:
            for holder in getattr(diagnosis, "holders", []):
                if holder.pid in known:
                    continue
                try:
                    parent = psutil.Process(holder.pid).ppid()
                except psutil.Error:
                    found.add(holder.pid)  # gone already: a child that lived a moment
                    continue
                if parent in known:
                    found.add(holder.pid)
        return found

    # -- the run -----------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            # Interrupted or failed: no worker may outlive the coordinator.
            for slot in self.slots:
                if slot.process is not None and slot.process.exitcode is None:
                    os.kill(slot.pid, signal.SIGKILL)
                    slot.process.join(10)

    def _run(self) -> None:
        for slot in self.slots:
            self.start(slot)
        began = time.monotonic()
        end = began + self.args.duration
        next_shot = began + 1.0  # let the first workers start up
        next_scan = began + self.args.scan_interval
        while (now := time.monotonic()) < end:
            select.select([self.sock], [], [], 0.01)
            self.drain()
            now = time.monotonic()
            self.resume_due(now)
            if now >= next_shot:
                self.shoot(now)
                next_shot = now + self.rng.expovariate(self.args.chaos)
            self.reap(restart=True)
            if now >= next_scan:
                self.check_diagnostics()
                next_scan = time.monotonic() + self.args.scan_interval
            self.watchdog(now)
            self.audit.poll()
            for problem in self.audit.violations:
                self.fail(problem)
            self.audit.violations.clear()
        self.totals["seconds"] = round(time.monotonic() - began)
        self.shutdown()
        self.final_checks()

    def shutdown(self) -> None:
        """Ask every worker to finish its operation and exit; a worker that cannot is a failure."""
        self.layout.stop.touch()
        self.resume_due(0.0, everyone=True)
        deadline = time.monotonic() + self.args.patience + 30.0
        while any(s.process is not None for s in self.slots) and time.monotonic() < deadline:
            select.select([self.sock], [], [], 0.05)
            self.drain()
            self.reap(restart=False)
        for slot in self.slots:
            if slot.process is not None:
                os.kill(slot.pid, signal.SIGUSR1)
                self.fail(
                    f"worker {slot.wid} did not stop (stacks in {self.layout.dump(slot.wid)})"
                )
                slot.process.kill()
                slot.process.join(10)
        # Children of killed workers die with them; orphaned child programs live a while.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            self.confirm_deaths()
            self.audit.poll()
            if not self.audit.undead() and not any(i.pid for i in self.audit.inherits.values()):
                break
            select.select([self.sock], [], [], 0.05)
        self.drain()

    def final_checks(self) -> None:
        self.audit.finish()
        for problem in self.audit.violations:
            self.fail(problem)
        for wid, pid, _ in self.audit.undead():
            self.fail(f"error: killed {wid} (pid {pid}) still alive after the run")
        problems, whole, torn = check_manifest(self.layout.manifest, self.acked)
        for problem in problems:
            self.fail(problem)
        self.totals["records"], self.totals["torn"] = whole, torn
        self.totals["missing"] = sum(p.startswith("acknowledged") for p in problems)
        if self.diag.available:
            for diagnosis in self.diag.snapshot():
                state = getattr(diagnosis.state, "name", str(diagnosis.state))
                if state not in ("FREE", "STALE_RECORD"):
                    self.fail(f"after every worker ended, scan() says {diagnosis.to_dict()}")
                self.totals["stale records"] += state == "STALE_RECORD"

    def report(self) -> None:
        t = self.totals
        forks = ", ".join(
            f"{name.removeprefix('fork ')} {n}"
            for name, n in sorted(t.items())
            if name.startswith("fork ")
        )
        rows = [
            (
                "duration",
                f"{t['seconds']} s, {self.args.workers} workers x {self.args.threads} "
                f"threads, seed {self.args.seed}",
            ),
            (
                "operations",
                f"{t['operations']} (completed {t['ok']}, busy {t['busy']}, errors {t['error']})",
            ),
            (
                "kills",
                f"{t['kills']} (while holding {t['kills while holding']}, "
                f"while waiting {t['kills while waiting']}, while a child program held its "
                f"lock {t['kills while a child held its lock']})",
            ),
            (
                "stops",
                f"{t['stops']} (while holding {t['stops while holding']}, "
                f"while waiting {t['stops while waiting']})",
            ),
            (
                "restarts",
                f"spawn {t['started by spawn']}, fork {t['started by fork']} "
                "(including the first generation)",
            ),
            (
                "forks",
                f"{t['forks']} children forked while holding ({forks or 'none'}); "
                f"{t['descriptor reuses']} took a lock on a descriptor number that held "
                "the parent's",
            ),
            (
                "pools",
                f"{t['pools']} fork pools under a held lock ({t['pool processes']} pool "
                f"processes, {t['pool tasks']} tasks, {t['pool tasks ok']} got their locks)",
            ),
            ("inheritors", f"{t['inheritors']} child programs handed a held lock"),
            ("waits", str(t["waits"])),
            ("timeouts", str(t["timeout"])),
            ("cancels", str(t["cancel"])),
            (
                "appends",
                f"{len(self.acked)} acknowledged, each checked present and whole "
                f"(missing or torn: {t['missing']}; the manifest has {t['records']} records "
                f"and {t['torn']} lines torn by kills)",
            ),
            (
                "audit",
                f"{self.audit.lines} lines, {self.audit.takeovers} takeovers of "
                "killed holders' locks",
            ),
            (
                "scans",
                f"{self.diag.scans} (held locks judged {self.diag.judged}; "
                f"scan() {'available' if self.diag.available else 'NOT available'}; "
                f"stale records at the end {t['stale records']})",
            ),
        ]
        tally = self.tally
        rows.append(
            ("exact", f"{tally.exact} / {tally.sampled} {_percent(tally.exact, tally.sampled)}")
        )
        axes = (
            ("state", "per state"),
            ("kind", "per kind"),
            ("method", "per method"),
            ("holder", "per holder"),
        )
        for axis, title in axes:
            found = {value: (exact, sampled) for value, exact, sampled in tally.rows(axis)}
            order = list(EXPECTED_STATES) if axis == "state" else sorted(found)
            cells = [
                f"{value} {found[value][0]}/{found[value][1]}" for value in order if value in found
            ]
            rows.append((f"  {title}", ", ".join(cells) or "none"))
        rows.append(
            (
                "  windows",
                ", ".join(f"{why} {n}" for why, n in tally.windows.most_common()) or "none",
            )
        )
        unprinted = len(tally.misses) - MAX_MISSES_PRINTED
        rows.append(
            (
                "misses",
                f"{len(tally.misses)}" + (f" ({unprinted} not printed)" if unprinted > 0 else ""),
            )
        )
        rows.append(
            (
                "violations",
                f"{len(self.violations)} "
                + (
                    "(" + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())) + ")"
                    if self.kinds
                    else ""
                ),
            )
        )
        for name, value in rows:
            print(f"{name:<11} {value}")


def _percent(part: int, whole: int) -> str:
    return f"({100.0 * part / whole:.2f} %)" if whole else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, help="seconds of chaos (600; 25 with --quick)")
    parser.add_argument("--workers", type=int, default=8, help="worker processes (8)")
    parser.add_argument(
        "--threads", type=int, default=2, help=f"threads per worker (2, max {MAX_THREADS})"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (random)")
    parser.add_argument("--quick", action="store_true", help="the short mode of the test suite")
    parser.add_argument("--chaos", type=float, default=4.0, help="kills+stops per second (4)")
    parser.add_argument("--kill-share", type=float, default=0.5, help="share of kills (0.5)")
    parser.add_argument("--patience", type=float, help="deadline of a normal wait (60; 15 quick)")
    parser.add_argument("--dwell", type=float, default=0.004, help="mean seconds inside locks")
    parser.add_argument("--scan-interval", type=float, default=0.3, help="seconds between samples")
    parser.add_argument(
        "--fork-share", type=float, default=0.08, help="pack operations that fork (0.08)"
    )
    parser.add_argument(
        "--pool-share", type=float, default=0.02, help="operations that run a fork pool (0.02)"
    )
    parser.add_argument(
        "--inherit-share",
        type=float,
        default=0.04,
        help="pack operations that hand a held lock to a child program (0.04)",
    )
    parser.add_argument(
        "--sabotage",
        nargs="?",
        const="lock",
        default="",
        choices=("lock", "fork", "record"),
        help="self-test: break the OS lock in the workers (lock), let forked children unlock "
        "their parents' locks (fork) or empty their records (record)",
    )
    parser.add_argument(
        "--misses-ok", action="store_true", help="exactness misses do not fail the run"
    )
    parser.add_argument("--root", type=Path, help="run directory (a fresh temporary one)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 25.0 if args.quick else 600.0
    if args.patience is None:
        args.patience = 15.0 if args.quick else 60.0
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    args.threads = max(1, min(args.threads, MAX_THREADS))
    return args


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    with tempfile.TemporaryDirectory(prefix="grex-stress-") as tmp:
        root = args.root if args.root is not None else Path(tmp)
        print(f"chaos run in {root}, seed {args.seed}, {args.duration:.0f} s", flush=True)
        run = Run(args, root.absolute())
        run.run()
        run.report()
    failed = run.violations or (run.tally.misses and not args.misses_ok)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
