"""One chaos worker for ``scripts/stress.py``: threads looping over random legal lock chains.

Each thread repeats one *pack operation*: a random legal chain of grex's
locks, outer to inner — a scheduler permit, one pack (or two together via
``acquire_all``), a backend, then a manifest append (``write()``) or a
manifest read (``read()``) — each taken in a random style: a wait with a
generous deadline, a short timeout, a cancel event set a moment later (or
already set), or ``try_acquire``. Around every critical section the thread
appends ``enter``/``exit`` lines to the O_APPEND audit log *while it holds
the lock*, so the order of lines in the log is the order the locks were
really held in. A manifest append is acknowledged to the coordinator only
after its ``write()`` hold is released.

Messages to the coordinator are datagrams on a Unix socket (one ``send`` per
message: a worker killed mid-report leaves nothing half-said).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from grex_locks import (
    BackendLock,
    LockBusy,
    LockCancelled,
    LockTimeout,
    ManifestLock,
    PackLock,
    Permit,
    Scheduler,
    acquire_all,
)
from grex_locks._core.gate import registry_size
from grex_locks._core.tiers import held_tiers

N_PACKS = 3
N_BACKENDS = 2
N_SLOTS = 2
MAX_THREADS = 8
#: What a thread is doing, one byte per thread in its worker's state file.
IDLE, WAITING = b"i", b"w"


@dataclass(frozen=True)
class Layout:
    """Where everything of one chaos run lives, under ``root``."""

    root: Path

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    def pack(self, index: int) -> Path:
        return self.root / "packs" / f"p{index}"

    def backend(self, index: int) -> Path:
        return self.root / "repos" / f"r{index}"

    @property
    def manifest_lock(self) -> Path:
        return self.root / "ws" / ".grex.lock"

    @property
    def manifest(self) -> Path:
        return self.root / "ws" / "manifest.jsonl"

    @property
    def audit(self) -> Path:
        return self.root / "audit.log"

    @property
    def socket(self) -> Path:
        return self.root / "coord.sock"

    @property
    def stop(self) -> Path:
        return self.root / "stop"

    def state(self, wid: str) -> Path:
        return self.root / "state" / wid

    def dump(self, wid: str) -> Path:
        return self.root / "dumps" / f"{wid}.txt"


class LockSet:
    """The five locks of a run; pickles as its locks (each as its constructor argument)."""

    def __init__(self, layout: Layout) -> None:
        self.scheduler = Scheduler(N_SLOTS, slots_dir=layout.slots)
        self.packs = [PackLock(layout.pack(i)) for i in range(N_PACKS)]
        self.backends = [BackendLock(layout.backend(i)) for i in range(N_BACKENDS)]
        self.manifest = ManifestLock(layout.manifest_lock)

    def paths(self) -> dict[str, Path]:
        """Audit name of every lock -> its lock file."""
        names = {f"s{i}": self.scheduler_slot(i) for i in range(N_SLOTS)}
        names.update({f"p{i}": lock.path for i, lock in enumerate(self.packs)})
        names.update({f"b{i}": lock.path for i, lock in enumerate(self.backends)})
        names["m"] = self.manifest.path
        return names

    def scheduler_slot(self, index: int) -> Path:
        slots_dir = self.scheduler.slots_dir
        assert slots_dir is not None
        return slots_dir / f"slot-{index}.lock"


@dataclass(frozen=True)
class Plan:
    """Everything a worker process needs; pickled to spawned workers."""

    layout: Layout
    locks: LockSet
    wid: str
    seed: int
    threads: int
    patience: float  # the deadline of a "wait" acquire: passing it is a failure
    dwell: float  # mean seconds spent inside the innermost lock
    sabotage: bool = False  # break the OS lock, to show that the checks catch it


def record_line(wid: str, seq: int) -> bytes:
    """The manifest line worker ``wid`` appends as its ``seq``-th record (no newline)."""
    digest = hashlib.sha256(f"{wid}:{seq}".encode()).hexdigest()
    return json.dumps({"w": wid, "s": seq, "d": digest * 3}, separators=(",", ":")).encode()


class PatienceExceeded(Exception):
    """A wait with the generous deadline ran out: a suspected deadlock."""


class Worker:
    """One worker process: its threads, its audit descriptor, its socket to the coordinator."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.audit_fd = os.open(plan.layout.audit, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(str(plan.layout.socket))
        self.state_fd = os.open(plan.layout.state(plan.wid), os.O_RDWR | os.O_CLOEXEC)
        self.seq = 0
        self.seq_mutex = threading.Lock()
        self.stopping = threading.Event()
        self.parent = os.getppid()

    def send(self, *words: object) -> None:
        try:
            self.sock.send(" ".join(str(w) for w in words).encode())
        except OSError:
            self.stopping.set()  # the coordinator is gone: wind down

    def audit(self, tid: int, event: str, names: list[str], mode: str) -> None:
        for name in names:
            os.write(self.audit_fd, f"{self.plan.wid} {tid} {event} {name} {mode}\n".encode())

    def set_state(self, tid: int, state: bytes) -> None:
        os.pwrite(self.state_fd, state, tid)

    def next_seq(self) -> int:
        with self.seq_mutex:
            self.seq += 1
            return self.seq

    def stop_requested(self) -> bool:
        # A coordinator that died (or was killed) leaves its workers orphaned.
        orphaned = os.getppid() != self.parent
        return orphaned or self.stopping.is_set() or self.layout.stop.exists()


class Chain:
    """One pack operation of one thread: takes locks onto an ExitStack, auditing each."""

    def __init__(self, worker: Worker, tid: int, rng: random.Random, stack: ExitStack) -> None:
        self.worker = worker
        self.tid = tid
        self.rng = rng
        self.stack = stack
        self.waits = 0
        self.acks: list[int] = []

    def take(
        self,
        names: list[str] | None,
        mode: str,
        attempt: Callable[[float | None, Any], AbstractContextManager[Any]],
        try_now: Callable[[], AbstractContextManager[Any]],
    ) -> Any:
        """Acquire in a random style; audit ``enter`` now and ``exit`` just before release."""
        rng, patience = self.rng, self.worker.plan.patience
        style = rng.choices(("wait", "short", "cancel", "try"), (5, 2, 2, 1))[0]
        timer: threading.Timer | None = None
        self.worker.set_state(self.tid, WAITING)
        try:
            if style == "wait":
                self.waits += 1
                try:
                    held = attempt(patience, None)
                except LockTimeout as exc:
                    raise PatienceExceeded(str(exc)) from exc
            elif style == "short":
                held = attempt(rng.uniform(0.0, 0.03), None)
            elif style == "cancel":
                cancel = threading.Event()
                if rng.random() < 0.2:
                    cancel.set()
                else:
                    timer = threading.Timer(rng.uniform(0.0, 0.03), cancel.set)
                    timer.start()
                held = attempt(patience, cancel)
            else:
                held = try_now()
        finally:
            self.worker.set_state(self.tid, IDLE)
            if timer is not None:
                timer.cancel()
        self.stack.enter_context(held)
        if names is None:  # a permit: its slot is known only now
            slot = cast(Permit, held).slot
            assert slot is not None  # a scheduler with slots_dir always names the slot
            names = [f"s{slot.name.removeprefix('slot-').removesuffix('.lock')}"]
        self.worker.audit(self.tid, "E", names, mode)
        self.stack.callback(self.worker.audit, self.tid, "X", names, mode)
        return held

    def run(self) -> None:
        locks, rng = self.worker.plan.locks, self.rng
        if rng.random() < 0.6:
            sched = locks.scheduler
            self.take(None, "w", lambda t, c: sched.acquire(timeout=t, cancel=c), sched.try_acquire)
        shape = rng.random()
        if shape < 0.25:
            first, second = rng.sample(range(N_PACKS), 2)
            group = [self.pack(first), self.pack(second)]
            self.take(
                [f"p{first}", f"p{second}"],
                "w",
                lambda t, c: acquire_all(group, timeout=t, cancel=c),
                lambda: acquire_all(group, timeout=0),
            )
        elif shape < 0.8:
            index = rng.randrange(N_PACKS)
            pack = self.pack(index)
            self.take(
                [f"p{index}"], "w", lambda t, c: pack.acquire(timeout=t, cancel=c), pack.try_acquire
            )
        if rng.random() < 0.5:
            index = rng.randrange(N_BACKENDS)
            backend = locks.backends[index]
            self.take(
                [f"b{index}"],
                "w",
                lambda t, c: backend.acquire(timeout=t, cancel=c),
                backend.try_acquire,
            )
        manifest = locks.manifest
        kind = rng.random()
        if kind < 0.35:
            self.take(
                ["m"], "w", lambda t, c: manifest.write(timeout=t, cancel=c), manifest.try_acquire
            )
            self.append_record()
        elif kind < 0.7:
            self.take(
                ["m"],
                "r",
                lambda t, c: manifest.read(timeout=t, cancel=c),
                lambda: manifest.read(timeout=0),
            )
            self.read_tail()
        self.dwell()

    def pack(self, index: int) -> PackLock:
        """The worker's shared PackLock object, or now and then a fresh one for the same pack."""
        shared = self.worker.plan.locks.packs[index]
        return shared if self.rng.random() < 0.7 else PackLock(self.worker.layout.pack(index))

    def dwell(self) -> None:
        mean = self.worker.plan.dwell
        # The random pacing that lets the killer find workers inside locks, not a handshake.
        time.sleep(min(self.rng.expovariate(1.0 / mean), 20 * mean))

    def append_record(self) -> None:
        """Append one record under the write lock, in two writes, without O_APPEND.

        Without the lock two writers would overwrite each other or interleave:
        the lock alone keeps records whole. A tail left torn by a writer that was
        killed mid-append is ended with a newline first, as a real manifest
        writer would repair it.
        """
        seq = self.worker.next_seq()
        line = record_line(self.worker.plan.wid, seq) + b"\n"
        fd = os.open(self.worker.layout.manifest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                os.write(fd, b"\n")
            half = len(line) // 2
            os.write(fd, line[:half])
            os.sched_yield()
            os.write(fd, line[half:])
        finally:
            os.close(fd)
        self.acks.append(seq)

    def read_tail(self) -> None:
        """Read the manifest's tail under the read lock (what a reader would do)."""
        with contextlib.suppress(FileNotFoundError), open(self.worker.layout.manifest, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            f.read()


def thread_loop(worker: Worker, tid: int) -> None:
    """Run pack operations until asked to stop; report each to the coordinator."""
    rng = random.Random(f"{worker.plan.seed}:{worker.plan.wid}:{tid}")
    wid = worker.plan.wid
    while not worker.stop_requested():
        outcome = "ok"
        with ExitStack() as stack:
            chain = Chain(worker, tid, rng, stack)
            try:
                chain.run()
            except PatienceExceeded as exc:
                outcome = "deadline"
                worker.send(
                    "bad", wid, tid, f"deadline: a wait of {worker.plan.patience} s ran out: {exc}"
                )
            except LockTimeout:
                outcome = "timeout"
            except LockCancelled:
                outcome = "cancel"
            except LockBusy:
                outcome = "busy"
            except Exception:  # noqa: BLE001 - any other error is a finding to report
                outcome = "error"
                worker.send(
                    "bad", wid, tid, "error: " + traceback.format_exc().replace("\n", " | ")
                )
        # Acknowledged only now: every write() hold of the chain has been released.
        for seq in chain.acks:
            worker.send("ack", wid, seq)
        if held_tiers():
            worker.send("bad", wid, tid, f"tiers still held after an operation: {held_tiers()}")
        worker.send("op", wid, tid, outcome, chain.waits)


def _sabotage() -> None:
    """Make every flock of this process a no-op: processes no longer exclude each other."""
    from grex_locks._core import os_lock as oslock

    def grant(fd: int, path: Path, *, shared: bool) -> bool:
        del fd, path, shared
        return True

    def nothing(fd: int, path: Path, **_: Any) -> None:
        del fd, path

    oslock.try_lock = grant
    oslock.lock_blocking = nothing
    oslock.unlock = nothing


def worker_main(plan: Plan) -> None:
    """Entry point of a worker process (spawned or forked)."""
    if plan.sabotage:
        _sabotage()
    dump = open(plan.layout.dump(plan.wid), "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    worker = Worker(plan)
    threads = [
        threading.Thread(
            target=thread_loop, args=(worker, tid), name=f"{plan.wid}-t{tid}", daemon=True
        )
        for tid in range(min(plan.threads, MAX_THREADS))
    ]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + 3 * plan.patience + 30
    for thread in threads:
        thread.join(max(0.0, give_up - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    worker.send("bye", plan.wid, registry_size(), stuck)
    os._exit(3 if stuck else 0)
