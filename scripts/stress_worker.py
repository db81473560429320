"""One chaos worker for ``scripts/stress.py``: threads looping over random legal lock chains.

Each thread repeats one *operation*. Most are a *pack operation*: a random
legal chain of grex's locks, outer to inner — a scheduler permit, one pack
(or two together via ``acquire_all``), a backend, then a manifest append
(``write()``) or a manifest read (``read()``) — each taken in a random style:
a wait with a generous deadline, a short timeout, a cancel event set a moment
later (or already set), ``try_acquire``, or now and then a plain ``with
lock:``. Inside the chain a thread may also

* fork a child while it holds the chain (``stress_forks``): the child
  collects garbage, exits in one of several ways, drops or releases the
  inherited holds, takes other locks (which reuse the closed descriptors'
  numbers), or tries the parent's own lock — and the parent then checks that
  its locks are still held and its owner records still name it;
* hand a held pack or backend lock's descriptor to a child program, as
  ``grex-locks run`` does (``stress_inheritor.py``): killed while it runs, the
  worker leaves an ORPHANED lock behind.

Some operations are a *sync*: the thread takes the workspace sync lock (or,
when another sync runs, a scheduler permit) and runs a ``fork``
``ProcessPoolExecutor`` under it, whose tasks take pack and manifest locks
themselves.

The audit log (O_APPEND, one ``write`` per line, see ``stress_audit.py``)
brackets every lock: ``W`` before an attempt, ``E`` once held (after acquire
returned) or ``F`` when it failed, ``X`` just before the release and ``R``
after it. So every moment a lock can be held by someone falls inside a
bracket, and the order of ``E``/``X`` lines is the order the locks were
really held in. A manifest append is acknowledged to the coordinator only
after its ``write()`` hold is released.

Messages to the coordinator are datagrams on a Unix socket (one ``send`` per
message: a worker killed mid-report leaves nothing half-said).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import importlib
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
from dataclasses import dataclass, field
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
    WorkspaceLock,
    acquire_all,
)
from grex_locks._core.tiers import held_tiers  # internals, for the end-of-operation checks

#: Where the library has kept its count of in-process gate entries, newest first.
_GATE_COUNTERS = (
    ("grex_locks._core.fair_queue", "queues_in_use"),
    ("grex_locks._core.gate", "registry_size"),
)


def registry_size() -> int:
    """How many in-process gate entries the library keeps (0 where it keeps no such count)."""
    for module, name in _GATE_COUNTERS:
        try:
            count = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return int(count())
    return 0


N_PACKS = 3
N_BACKENDS = 2
N_SLOTS = 2
MAX_THREADS = 8
#: What a thread is doing, one byte per thread in its worker's state file.
IDLE, WAITING = b"i", b"w"
#: Acquire styles; the timed ones may leave a kernel-wait helper behind.
STYLES = ("wait", "short", "cancel", "try", "with")
TIMED_STYLES = ("wait", "short", "cancel")


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
    def workspace(self) -> Path:
        return self.root / "ws"

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
    """The locks of a run; pickles as its locks (each as its constructor argument)."""

    def __init__(self, layout: Layout) -> None:
        self.scheduler = Scheduler(N_SLOTS, slots_dir=layout.slots)
        self.workspace = WorkspaceLock(layout.workspace)
        self.packs = [PackLock(layout.pack(i)) for i in range(N_PACKS)]
        self.backends = [BackendLock(layout.backend(i)) for i in range(N_BACKENDS)]
        self.manifest = ManifestLock(layout.manifest_lock)

    def paths(self) -> dict[str, Path]:
        """Audit name of every lock -> its lock file."""
        names = {f"s{i}": self.scheduler_slot(i) for i in range(N_SLOTS)}
        names["ws"] = self.workspace.path
        names.update({f"p{i}": lock.path for i, lock in enumerate(self.packs)})
        names.update({f"b{i}": lock.path for i, lock in enumerate(self.backends)})
        names["m"] = self.manifest.path
        return names

    def scheduler_slot(self, index: int) -> Path:
        slots_dir = self.scheduler.slots_dir
        assert slots_dir is not None
        return slots_dir / f"slot-{index}.lock"


def lock_kind(name: str) -> str:
    """The kind of lock an audit name stands for."""
    if name == "ws":
        return "workspace"
    return {"p": "pack", "b": "backend", "m": "manifest", "s": "slot"}[name[0]]


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
    sabotage: str = ""  # "lock", "fork" or "record": break something, to show the checks catch it
    fork_share: float = 0.08  # share of pack operations that fork a child while holding
    pool_share: float = 0.02  # share of operations that run a fork pool under a held lock
    inherit_share: float = 0.04  # share of pack operations that hand a lock to a child program


def record_line(wid: str, seq: int) -> bytes:
    """The manifest line worker ``wid`` appends as its ``seq``-th record (no newline)."""
    digest = hashlib.sha256(f"{wid}:{seq}".encode()).hexdigest()
    return json.dumps({"w": wid, "s": seq, "d": digest * 3}, separators=(",", ":")).encode()


def process_start(pid: int) -> int:
    """The start time of process ``pid`` in clock ticks since boot (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


class PatienceExceeded(Exception):
    """A wait with the generous deadline ran out: a suspected deadlock."""


class Actor:
    """One process of the run that takes locks: it audits, appends, and talks to the coordinator.

    A worker is one; so are its forked children and its fork pool's workers,
    each under a name of its own (``<wid>.f<pid>``, ``<wid>.q<pid>``) that the
    coordinator treats as killed when ``<wid>`` is.
    """

    def __init__(self, plan: Plan, wid: str, audit_fd: int, sock: socket.socket) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.wid = wid
        self.pid = os.getpid()
        self.audit_fd = audit_fd
        self.sock = sock
        self.seq = 0
        self.seq_mutex = threading.Lock()
        self.stopping = threading.Event()
        self.write(f"P {wid} {self.pid} {process_start(self.pid)}")

    def mine(self) -> bool:
        """Whether this process is the actor (a forked child inherits the object, not the role)."""
        return os.getpid() == self.pid

    def write(self, line: str) -> None:
        if self.mine():
            os.write(self.audit_fd, (line + "\n").encode())

    def send(self, *words: object) -> None:
        if not self.mine():
            return
        try:
            self.sock.send(" ".join(str(w) for w in words).encode())
        except OSError:
            self.stopping.set()  # the coordinator is gone: wind down

    def audit(self, tid: int, event: str, names: list[str], mode: str, extra: str = "") -> None:
        for name in names:
            self.write(f"{self.wid} {tid} {event} {name} {mode}{' ' + extra if extra else ''}")

    def set_state(self, tid: int, state: bytes) -> None:
        del tid, state

    def next_seq(self) -> int:
        with self.seq_mutex:
            self.seq += 1
            return self.seq

    def stop_requested(self) -> bool:
        return self.stopping.is_set() or self.layout.stop.exists()


class Worker(Actor):
    """One worker process: its threads, its audit descriptor, its socket to the coordinator."""

    def __init__(self, plan: Plan) -> None:
        audit_fd = os.open(plan.layout.audit, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect(str(plan.layout.socket))
        super().__init__(plan, plan.wid, audit_fd, sock)
        self.state_fd = os.open(plan.layout.state(plan.wid), os.O_RDWR | os.O_CLOEXEC)
        self.parent = os.getppid()

    def set_state(self, tid: int, state: bytes) -> None:
        if self.mine():
            os.pwrite(self.state_fd, state, tid)

    def stop_requested(self) -> bool:
        # A coordinator that died (or was killed) leaves its workers orphaned.
        return os.getppid() != self.parent or super().stop_requested()


@dataclass
class Taken:
    """One thing a chain holds: its audit names, mode, the held object and the lock object."""

    names: list[str]
    mode: str
    held: Any
    lock: Any = None
    paths: list[Path] = field(default_factory=list)


class Chain:
    """One operation of one thread: takes locks onto an ExitStack, auditing each."""

    def __init__(self, actor: Actor, tid: int, rng: random.Random, stack: ExitStack) -> None:
        self.actor = actor
        self.tid = tid
        self.rng = rng
        self.stack = stack
        self.waits = 0
        self.acks: list[int] = []
        self.taken: list[Taken] = []
        self.thread_name = threading.current_thread().name

    def take(
        self,
        names: list[str] | None,
        mode: str,
        attempt: Callable[[float | None, Any], AbstractContextManager[Any]],
        try_now: Callable[[], AbstractContextManager[Any]],
        *,
        lock: Any = None,
        style: str | None = None,
    ) -> Any:
        """Take a lock in a random style, audited: W, then E or F; X and R around the release.

        ``names`` None is a scheduler permit: its slot is known only once held
        (``W s?``). A ``lock`` given may also be taken with a plain ``with``.
        """
        rng, patience, actor = self.rng, self.actor.plan.patience, self.actor
        if style is None:
            style = rng.choices(STYLES, (50, 20, 20, 10, 4 if lock is not None else 0))[0]
        wanted = names if names is not None else ["s?"]
        timer: threading.Timer | None = None
        actor.audit(self.tid, "W", wanted, mode, style)
        actor.set_state(self.tid, WAITING)
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
            elif style == "with":
                self.waits += 1
                held = lock.__enter__()  # a plain `with lock:`, its exit below
                held = _WithBlock(lock)
            else:
                held = try_now()
        except BaseException:
            actor.audit(self.tid, "F", wanted, mode, style)
            raise
        finally:
            actor.set_state(self.tid, IDLE)
            if timer is not None:
                timer.cancel()
        if names is None:  # a permit: its slot is known only now
            slot = cast(Permit, held).slot
            assert slot is not None  # a scheduler with slots_dir always names the slot
            names = [f"s{slot.name.removeprefix('slot-').removesuffix('.lock')}"]
        # R is registered first so that it runs last: after the release returned.
        self.stack.callback(actor.audit, self.tid, "R", names, mode)
        self.stack.enter_context(held)
        actor.audit(self.tid, "E", names, mode, self.thread_name)
        self.stack.callback(actor.audit, self.tid, "X", names, mode)
        paths = self.lock_paths(names)
        self.taken.append(Taken(names, mode, held, lock, paths))
        return held

    def lock_paths(self, names: list[str]) -> list[Path]:
        paths = self.actor.plan.locks.paths()
        return [paths[name] for name in names]

    def take_pack(self, index: int) -> Any:
        pack = self.pack(index)
        return self.take(
            [f"p{index}"],
            "w",
            lambda t, c: pack.acquire(timeout=t, cancel=c),
            pack.try_acquire,
            lock=pack,
        )

    def take_manifest(self, write: bool) -> None:
        manifest = self.actor.plan.locks.manifest
        if write:
            self.take(
                ["m"],
                "w",
                lambda t, c: manifest.write(timeout=t, cancel=c),
                manifest.try_acquire,
                lock=manifest,
            )
            self.append_record()
        else:
            self.take(
                ["m"],
                "r",
                lambda t, c: manifest.read(timeout=t, cancel=c),
                lambda: manifest.read(timeout=0),
            )
            self.read_tail()

    def run(self) -> None:
        """A pack operation: a random legal chain, with now and then a fork or an inheritor."""
        locks, rng, plan = self.actor.plan.locks, self.rng, self.actor.plan
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
            self.take_pack(rng.randrange(N_PACKS))
        if rng.random() < 0.5:
            index = rng.randrange(N_BACKENDS)
            backend = locks.backends[index]
            self.take(
                [f"b{index}"],
                "w",
                lambda t, c: backend.acquire(timeout=t, cancel=c),
                backend.try_acquire,
                lock=backend,
            )
        if rng.random() < plan.inherit_share:
            from stress_forks import hand_to_inheritor

            hand_to_inheritor(self)
        if rng.random() < plan.fork_share:
            from stress_forks import fork_child

            fork_child(self)
        kind = rng.random()
        if kind < 0.35:
            self.take_manifest(write=True)
        elif kind < 0.7:
            self.take_manifest(write=False)
        self.dwell()

    def pack(self, index: int) -> PackLock:
        """The worker's shared PackLock object, or now and then a fresh one for the same pack."""
        shared = self.actor.plan.locks.packs[index]
        return shared if self.rng.random() < 0.7 else PackLock(self.actor.layout.pack(index))

    def dwell(self) -> None:
        mean = self.actor.plan.dwell
        # The random pacing that lets the killer find workers inside locks, not a handshake.
        time.sleep(min(self.rng.expovariate(1.0 / mean), 20 * mean))

    def append_record(self) -> None:
        """Append one record under the write lock, in two writes, without O_APPEND.

        Without the lock two writers would overwrite each other or interleave:
        the lock alone keeps records whole. A tail left torn by a writer that was
        killed mid-append is ended with a newline first, as a real manifest
        writer would repair it.
        """
        seq = self.actor.next_seq()
        line = record_line(self.actor.wid, seq) + b"\n"
        fd = os.open(self.actor.layout.manifest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        with contextlib.suppress(FileNotFoundError), open(self.actor.layout.manifest, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            f.read()


class _WithBlock:
    """The exit half of a plain ``with lock:`` whose enter already ran."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __enter__(self) -> _WithBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__(*exc)


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, PatienceExceeded):
        return "deadline"
    if isinstance(exc, LockTimeout):
        return "timeout"
    if isinstance(exc, LockCancelled):
        return "cancel"
    if isinstance(exc, LockBusy):
        return "busy"
    return "error"


def thread_loop(worker: Worker, tid: int) -> None:
    """Run operations until asked to stop; report each to the coordinator."""
    from stress_forks import child_finish, sync_with_pool

    rng = random.Random(f"{worker.plan.seed}:{worker.plan.wid}:{tid}")
    wid = worker.plan.wid
    while not worker.stop_requested():
        outcome = "ok"
        chain: Chain | None = None
        try:
            with ExitStack() as stack:
                chain = Chain(worker, tid, rng, stack)
                if rng.random() < worker.plan.pool_share:
                    sync_with_pool(chain)
                else:
                    chain.run()
        except BaseException as exc:
            if not worker.mine():
                child_finish(exc)  # never returns
            if not isinstance(exc, Exception):
                raise
            outcome = _outcome(exc)
            if outcome == "deadline":
                worker.send(
                    "bad", wid, tid, f"deadline: a wait of {worker.plan.patience} s ran out: {exc}"
                )
            elif outcome == "error":
                worker.send(
                    "bad", wid, tid, "error: " + traceback.format_exc().replace("\n", " | ")
                )
        # Acknowledged only now: every write() hold of the chain has been released.
        for seq in chain.acks if chain is not None else []:
            worker.send("ack", wid, seq)
        if held_tiers():
            worker.send("bad", wid, tid, f"tiers still held after an operation: {held_tiers()}")
        worker.send("op", wid, tid, outcome, chain.waits if chain is not None else 0)


def _sabotage() -> None:
    """Make every flock of this process a no-op: processes no longer exclude each other."""
    from grex_locks._core import os_lock as oslock

    def grant(fd: int, path: Path, shared: bool) -> bool:
        del fd, path, shared
        return True

    def nothing(fd: int, path: Path, **_: Any) -> None:
        del fd, path

    oslock.try_lock = grant
    oslock.lock_blocking = nothing
    oslock.unlock = nothing


def worker_main(plan: Plan) -> None:
    """Entry point of a worker process (spawned or forked)."""
    if plan.sabotage == "lock":
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
