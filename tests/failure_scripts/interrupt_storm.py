"""Scenario: KeyboardInterrupt at random points of acquire and release, many times over.

Usage: ``interrupt_storm.py ROOT single|storm SECONDS SEED``. Each iteration
arms ``ITIMER_REAL`` (one shot after 10-400 us; for ``storm`` a repeating timer
that raises up to three interrupts, the later ones while the library unwinds
from the first) and performs one
random lock operation — a pack, a manifest read or write, ``acquire_all``
over two packs, a scheduler permit — in a random style (blocking, timeout,
cancel event, try), often against a rival: another thread of this process
(the in-process gate) or another process holding the file with a bare flock
(the kernel wait, in a helper thread when there is a timeout). The SIGALRM
handler raises ``KeyboardInterrupt`` only when the signal lands inside
grex_locks (or in what it calls), never in this script's own lines, so every
interrupt is the library's to handle. After each iteration, with the timer
disarmed and the rivals done, a lock object still held is released through
its public ``release()`` (what a careful user can do; counted as
"recoverable" — a hold whose ``release()`` refuses is a failure); then: no
gate entry, no tier, no object held, every
lock file free for a new descriptor, no owner record content. A failure is
recorded with where the interrupt landed, then everything is forced free so
that later iterations are judged afresh. Prints one JSON line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from left_behind import files_left, force_free, kept_in_process

import grex_locks
from grex_locks import LockError, ManifestLock, PackLock, Scheduler, acquire_all

LIBRARY = os.path.dirname(os.path.abspath(grex_locks.__file__))
HERE = os.path.abspath(__file__)
DEADLINE = 10.0
#: A storm raises up to this many interrupts in one operation (a hurried second
#: and third Ctrl-C), the later ones while the library unwinds from the first.
STORM_BURST = 3
#: A helper thread of an abandoned wait must be gone this soon once nobody holds the lock.
HELPER_DEADLINE = 2.0
#: Failures collected (each followed by a forced recovery) before giving up.
MAX_FAILURES = 20

FOREIGN = """
import fcntl, os, sys, time
for line in sys.stdin:
    path, seconds = line.split()
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("h", flush=True)
    time.sleep(float(seconds))
    os.close(fd)
    print("d", flush=True)
"""

armed = False
phase = "idle"
#: Interrupts raised in the current iteration, and how many it may take.
burst = 0
max_burst = 1
interrupted: Counter[str] = Counter()
#: Where the last KeyboardInterrupt was raised: the innermost library frames.
sites: list[str] = []


def on_alarm(signum: int, frame: FrameType | None) -> None:
    """Raise KeyboardInterrupt if the signal landed in library code (or below it)."""
    global burst
    del signum
    if not armed or burst >= max_burst:
        return
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name.startswith(LIBRARY):
            burst += 1
            interrupted[phase] += 1
            sites.append(f"{os.path.basename(name)}:{frame.f_lineno} {frame.f_code.co_name}")
            raise KeyboardInterrupt
        if name == HERE:
            return
        frame = frame.f_back


class Rival(threading.Thread):
    """Another thread of this process holding a lock for a moment when told to."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.Queue[tuple[Any, float]] = queue.Queue()
        self.holding = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            lock, seconds = self.jobs.get()
            held = lock.acquire(timeout=DEADLINE)
            self.holding.set()
            time.sleep(seconds)  # the rival's hold time: pacing, not a handshake
            held.release()
            self.done.set()


class Lines:
    """Lines from a pipe, each awaited with a deadline (unbuffered, so select sees them all)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def next(self, deadline: float) -> str:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], deadline)
            chunk = os.read(self.fd, 4096) if ready else b""
            if not chunk:
                raise TimeoutError("the foreign holder did not answer")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


class Storm:
    def __init__(self, root: Path, mode: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.mode = mode
        self.packs = [PackLock(root / "p0"), PackLock(root / "p1")]
        self.manifest = ManifestLock(root / "m.lock")
        self.scheduler = Scheduler(1, slots_dir=root / "slots")
        self.files = [
            *(p.path for p in self.packs),
            self.manifest.path,
            root / "slots" / "slot-0.lock",
        ]
        # The rival's own objects for the same files: it contends through the gate.
        self.rival_locks = [
            PackLock(root / "p0"),
            PackLock(root / "p1"),
            ManifestLock(root / "m.lock"),
        ]
        self.rival_scheduler = Scheduler(1, slots_dir=root / "slots")
        self.stuck: set[threading.Thread] = set()
        #: Interrupts after which a lock was still held but ``release()`` set all right.
        self.recoverable: list[dict[str, Any]] = []
        self.rival = Rival()
        self.rival.start()
        self.foreign = subprocess.Popen(
            [sys.executable, "-c", FOREIGN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.foreign.stdout is not None
        self.answers = Lines(self.foreign.stdout.fileno())

    def operation(self) -> tuple[str, Any, Any]:
        """A random operation: (name, acquire callable, the target file index)."""
        rng = self.rng
        style = rng.choice(["block", "timeout", "cancel", "try"])
        timeout = rng.choice([0.0, 0.002, 0.02, 1.0])
        cancel = threading.Event()
        if style == "cancel" and rng.random() < 0.5:
            threading.Timer(rng.uniform(0, 0.003), cancel.set).start()
        kind = rng.choice(["pack", "pack", "read", "write", "group", "permit"])
        target: Any
        if kind in ("pack", "write", "read"):
            index = rng.randrange(2) if kind == "pack" else 2
            lock: Any = self.packs[index] if kind == "pack" else self.manifest
            take = getattr(lock, {"pack": "acquire", "write": "write", "read": "read"}[kind])
            target = index
        elif kind == "group":
            lock, target = None, rng.randrange(2)

            def take(**kw: Any) -> Any:
                return acquire_all(self.packs, **kw)
        else:
            lock, target, take = self.scheduler, 3, self.scheduler.acquire
        calls = {
            "block": take,
            "timeout": lambda: take(timeout=timeout),
            "cancel": lambda: take(timeout=DEADLINE, cancel=cancel),
            "try": lambda: take(timeout=0) if kind in ("group", "read") else lock.try_acquire(),
        }
        return f"{kind}/{style}", calls[style], target

    def contend(self, target: int) -> str:
        """Maybe have a rival hold the target file for a moment; return who."""
        who = self.rng.choice(["none", "none", "thread", "process"])
        seconds = self.rng.uniform(0.0005, 0.005)
        if who == "thread":
            lock = self.rival_scheduler if target == 3 else self.rival_locks[target]
            self.rival.holding.clear()
            self.rival.done.clear()
            self.rival.jobs.put((lock, seconds))
            if not self.rival.holding.wait(DEADLINE):
                raise TimeoutError("the rival thread did not take its lock")
        elif who == "process":
            assert self.foreign.stdin is not None
            self.foreign.stdin.write(f"{self.files[target]} {seconds}\n")
            self.foreign.stdin.flush()
            if self.answers.next(DEADLINE) != "h":
                raise RuntimeError("the foreign holder misbehaved")
        return who

    def settle(self, who: str) -> None:
        if who == "thread" and not self.rival.done.wait(DEADLINE):
            raise TimeoutError("the rival thread did not let go")
        if who == "process" and self.answers.next(DEADLINE) != "d":
            raise RuntimeError("the foreign holder misbehaved")

    def helpers_left(self) -> list[str]:
        """Wait for the helper threads of abandoned waits; name those that do not end.

        An abandoned kernel wait lets go of the lock when the kernel grants it,
        in its own thread: those threads must be done before the lock is judged.
        """
        found = []
        for thread in threading.enumerate():
            helper = thread.name in ("grex-locks-flock-wait", "grex-locks-cancel-watch")
            if not helper or thread in self.stuck:
                continue
            started = getattr(thread, "_started", None)
            if started is not None and not started.is_set():
                # An interrupt inside CPython's Thread.start() can leave the
                # thread's _started event with its lock taken for good: the
                # thread never runs (so it holds nothing), and waiting on that
                # event would hang this script. Read the flag, never wait.
                self.stuck.add(thread)
                continue
            if thread.ident is not None:
                thread.join(HELPER_DEADLINE)
            if thread.is_alive():
                self.stuck.add(thread)
                found.append(f"{thread.name} thread still running after {HELPER_DEADLINE} s")
        return found

    def problems(self) -> list[str]:
        found = self.helpers_left()
        found += kept_in_process([*self.packs, self.manifest], self.scheduler)
        return found + files_left(self.files)

    def iterate(self) -> dict[str, Any] | None:
        global armed, phase, burst
        name, call, target = self.operation()
        who = self.contend(target)
        delay = (
            self.rng.uniform(1e-5, 4e-4) if self.rng.random() < 0.8 else self.rng.uniform(0, 4e-3)
        )
        interval = self.rng.uniform(3e-5, 3e-4) if self.mode == "storm" else 0.0
        outcome = "done"
        held: Any = None
        sites.clear()
        burst = 0
        phase = "acquire"
        armed = True
        signal.setitimer(signal.ITIMER_REAL, delay, interval)
        try:
            held = call()
            phase = "release"
            held.release()
        except KeyboardInterrupt:
            outcome = f"interrupted in {phase}"
        except LockError as exc:
            outcome = type(exc).__name__
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        phase = "idle"
        self.settle(who)
        found, released = [], []
        if outcome == "interrupted in release" and held is not None and hasattr(held, "_undo"):
            # A permit or a group: release() again finishes an interrupted release.
            try:
                if held._undo is not None:
                    held.release()
                    released.append(type(held).__name__)
            except RuntimeError as exc:
                found.append(f"{type(held).__name__} release() refuses: {exc}")
        for lock in [*self.packs, self.manifest]:
            if lock.held:
                # What a careful user can do after an interrupt: ask and release.
                try:
                    lock.release()
                    released.append(
                        lock.path.name if lock is self.manifest else lock.path.parent.name
                    )
                except RuntimeError as exc:
                    found.append(f"{lock.path} is held but release() refuses: {exc}")
        if released and not found:
            self.recoverable.append({"operation": name, "outcome": outcome, "released": released,
                                     "interrupted at": list(sites)})  # fmt: skip
        found += self.problems()
        if found:
            self.recover()
            return {
                "operation": name,
                "rival": who,
                "outcome": outcome,
                "interrupted at": list(sites),
                "problems": found,
            }
        return None

    def recover(self) -> None:
        """Force everything free after a failure, so that later iterations are judged afresh."""
        objects = [*self.packs, self.manifest, *self.rival_locks]
        cores = [lock._core for lock in objects]
        cores += [*self.scheduler._opened.cores, *self.rival_scheduler._opened.cores]
        force_free(self.files, cores)


def main() -> None:
    root, mode, seconds, seed = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    global max_burst
    max_burst = STORM_BURST if mode == "storm" else 1
    signal.signal(signal.SIGALRM, on_alarm)
    # A wait that never ends (a helper thread that never ran, taken over) is
    # shown with every thread's stack rather than as a bare test timeout.
    faulthandler.dump_traceback_later(seconds + 30.0, exit=True)
    storm = Storm(root, mode, seed)
    failures: list[dict[str, Any]] = []
    iterations = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(failures) < MAX_FAILURES:
        failure = storm.iterate()
        iterations += 1
        if failure is not None:
            failures.append({"iteration": iterations, **failure})
    took = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom grex_locks import PackLock, ManifestLock\n"
         "for p in sys.argv[1:3]: PackLock(p).try_acquire().release()\n"
         "ManifestLock(sys.argv[3]).try_acquire().release()\nprint('took all')",
         *(str(p.parent) for p in storm.files[:2]), str(storm.files[2])],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    report = {
        "iterations": iterations,
        "interrupted": {"acquire": interrupted["acquire"], "release": interrupted["release"]},
        "failures": failures,
        "recoverable": storm.recoverable,
        "fresh_process_took_all": took.stdout.strip() == "took all",
    }
    print(json.dumps(report))
    os._exit(0)  # the rival thread and the foreign holder are done with


if __name__ == "__main__":
    main()
