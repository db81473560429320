"""Chaos run: worker processes hammer grex's five locks while a killer shoots at them.

Usage::

    python scripts/stress.py [--duration S] [--workers N] [--seed N] [--quick]

N worker processes (started with ``spawn`` and ``fork`` at random), each with
a few threads, loop over random legal chains of the locks (see
``stress_worker.py``). Meanwhile this process, the coordinator, SIGKILLs,
SIGSTOPs and SIGCONTs random workers — whatever they are doing: waiting,
holding, appending — and restarts the killed ones. Invariants, each a hard
failure (see ``stress_audit.py``):

* mutual exclusion, from the O_APPEND audit log of ``enter``/``exit`` lines;
* nothing lost: every acknowledged manifest append is present and whole;
* no deadlock: every wait has a deadline, and a wait past it is a failure
  (reported with a dump of ``scan()``); a thread that stops reporting is too;
* diagnostics agree with the kernel: ``scan()`` never says FREE for a lock
  held throughout the scan by a live worker, nor HELD naming a reaped one.

It prints totals (operations, kills, stops, waits, timeouts, cancels,
violations) and exits 1 on any violation.
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
from dataclasses import dataclass, field
from multiprocessing.context import ForkContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stress_audit import AuditLog, Diagnostics, check_manifest, kernel_says_holds
from stress_worker import MAX_THREADS, WAITING, Layout, LockSet, Plan, worker_main

START_METHODS = ("spawn", "fork")
#: Violations printed as they happen; the rest are only counted.
MAX_PRINTED = 50
#: Which invariant a violation breaks, told by its words.
KINDS = (
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
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.layout.socket))
        self.sock.setblocking(False)
        self.audit_fd = os.open(self.layout.audit, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.audit = AuditLog(self.layout.audit)
        self.diag = Diagnostics(root, self.locks.paths())
        self.totals: Counter[str] = Counter()
        self.violations: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.acked: set[tuple[str, int]] = set()
        self.dead: dict[int, float] = {}
        self.slots = [Slot(i) for i in range(args.workers)]
        self.contexts: dict[str, ForkContext | SpawnContext] = {
            "fork": multiprocessing.get_context("fork"),
            "spawn": multiprocessing.get_context("spawn"),
        }

    # -- workers ---------------------------------------------------------------

    def start(self, slot: Slot) -> None:
        slot.gen += 1
        slot.wid = f"w{slot.index}.{slot.gen}"
        self.layout.state(slot.wid).write_bytes(b"i" * MAX_THREADS)
        method = self.rng.choice(START_METHODS)
        plan = Plan(
            self.layout,
            self.locks,
            slot.wid,
            self.args.seed,
            self.args.threads,
            self.args.patience,
            self.args.dwell,
            self.args.sabotage,
        )
        process = self.contexts[method].Process(target=worker_main, args=(plan,), daemon=True)
        process.start()
        assert process.pid is not None
        slot.process, slot.pid, slot.killed, slot.stopped_until = process, process.pid, False, None
        try:
            slot.start_time = psutil.Process(process.pid).create_time()
        except psutil.Error:
            slot.start_time = 0.0
        now = time.monotonic()
        slot.last_seen = dict.fromkeys(range(self.args.threads), now)
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
            self.fail(f"worker {wid} thread {words[2]}: {' '.join(words[3:])}")
            if words[3].startswith("deadline"):
                print(f"scan() at the deadline:\n{self.diag.dump()}", flush=True)
        elif kind == "bye" and (words[2] != "0" or words[3] != "0"):
            self.fail(
                f"worker {wid} ended with registry_size()={words[2]}, stuck threads {words[3]}"
            )

    # -- chaos -------------------------------------------------------------------

    def shoot(self, now: float) -> None:
        """One random act of violence: SIGKILL or SIGSTOP a random live worker."""
        live = [s for s in self.slots if s.process is not None and not s.killed]
        if not live:
            return
        slot = self.rng.choice(live)
        self.audit.poll()
        holding = self.audit.holding(slot.wid)
        try:
            waiting = WAITING in self.layout.state(slot.wid).read_bytes()
        except OSError:
            waiting = False
        if self.rng.random() < self.args.kill_share:
            # Logged before the signal is sent, so the kernel's release of the
            # victim's locks always comes after this line in the audit log.
            os.write(self.audit_fd, f"C kill {slot.wid}\n".encode())
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

    # -- diagnostics ---------------------------------------------------------------

    def check_diagnostics(self) -> None:
        """Judge one scan against holds that began before it and ended after it."""
        self.audit.poll()
        held = self.audit.live_holds()
        dead = dict(self.dead)
        pids = {s.wid: s.pid for s in self.slots if s.process is not None and not s.killed}
        diagnoses = self.diag.snapshot()
        paths = self.locks.paths()
        kernel = {
            (lock, wid): kernel_says_holds(pids[wid], paths[lock])
            for lock, holders in held.items()
            for wid, _tid in holders
            if wid in pids
        }
        for wid, tid, what, lock, _mode in self.audit.poll():
            if what == "X" and lock in held:
                held[lock].discard((wid, tid))
        held = {lock: holders for lock, holders in held.items() if holders}
        for problem in self.diag.judge(diagnoses, held, kernel, dead):
            self.fail(problem)

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
        self.drain()

    def final_checks(self) -> None:
        self.audit.finish()
        for problem in self.audit.violations:
            self.fail(problem)
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
                f"while waiting {t['kills while waiting']})",
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
            (
                "violations",
                f"{len(self.violations)} "
                + (
                    "(" + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())) + ")"
                    if self.kinds
                    else ""
                ),
            ),
        ]
        for name, value in rows:
            print(f"{name:<11} {value}")


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
    parser.add_argument("--scan-interval", type=float, default=0.5, help="seconds between scans")
    parser.add_argument(
        "--sabotage", action="store_true", help="break the OS lock in the workers (self-test)"
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
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
