"""Helpers for the tests of WorkspaceLock, BackendLock, ManifestLock, Scheduler and acquire_all.

Everything a child process runs lives here, at module level, so that a
``spawn`` child can import it by name. Children report through a queue (see
:class:`Children`); every wait on a child, a thread or an event has a
deadline, so a broken lock fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from grex_locks import (
    BackendLock,
    LockBusy,
    LockError,
    ManifestLock,
    PackLock,
    Scheduler,
    WorkspaceLock,
    acquire_all,
)
from grex_locks._core import fair_queue, tiers

#: The bound on every handshake with a thread or a child process. Generous on
#: purpose: it only decides how long a broken test takes to fail.
DEADLINE = 10.0

#: A child holding something for a test lets go on its own after this long.
BACKSTOP = 30.0

MpEvent = multiprocessing.synchronize.Event
MpBarrier = multiprocessing.synchronize.Barrier


def assert_clean() -> None:
    """This thread holds no tier and the gate registry is empty."""
    assert fair_queue.queues_in_use() == 0, f"{fair_queue.queues_in_use()} gate entries left behind"
    assert tiers.held_tiers() == (), f"tiers left held: {tiers.held_tiers()}"


# -- child processes ---------------------------------------------------------------------------


def _report(
    results: multiprocessing.queues.Queue[tuple[int, bool, Any]],
    index: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        outcome = target(*args)
    except BaseException:  # noqa: BLE001 - handed to the test as a failure
        results.put((index, False, traceback.format_exc()))
        return
    results.put((index, True, outcome))


class Children:
    """Start functions of this module in child processes and collect what they return.

    Leaving the ``with`` block SIGKILLs any child still alive, so a failing
    test never leaves a lock holder behind.
    """

    def __init__(self, method: str = "spawn") -> None:
        self.ctx = multiprocessing.get_context(method)
        self._results: multiprocessing.queues.Queue[tuple[int, bool, Any]] = self.ctx.Queue()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._collected: dict[int, Any] = {}

    def start(self, target: Callable[..., Any], *args: Any) -> int:
        """Run ``target(*args)`` in a new child; return the child's pid."""
        index = len(self.processes)
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=_report, args=(self._results, index, target, args), daemon=True
        )
        process.start()
        self.processes.append(process)
        pid: int | None = process.pid
        assert pid is not None
        return pid

    def event(self) -> MpEvent:
        return self.ctx.Event()

    def barrier(self, parties: int) -> MpBarrier:
        return self.ctx.Barrier(parties)

    def results(self, timeout: float = DEADLINE) -> list[Any]:
        """What every child returned, in start order; a child that raised fails the test."""
        deadline = time.monotonic() + timeout
        while len(self._collected) < len(self.processes):
            left = deadline - time.monotonic()
            try:
                index, ok, outcome = self._results.get(timeout=max(left, 0.001))
            except queue.Empty:
                missing = [p.pid for i, p in enumerate(self.processes) if i not in self._collected]
                raise AssertionError(
                    f"children {missing} reported nothing in {timeout} s"
                ) from None
            if not ok:
                raise AssertionError(f"child {self.processes[index].pid} failed:\n{outcome}")
            self._collected[index] = outcome
        for process in self.processes:
            process.join(DEADLINE)
            assert process.exitcode == 0, f"child {process.pid} exited with {process.exitcode}"
        return [self._collected[i] for i in range(len(self.processes))]

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(DEADLINE)
        self._results.close()
        self._results.join_thread()


def must_wait(event: threading.Event | MpEvent, what: str, timeout: float = DEADLINE) -> None:
    """Wait for ``event``; fail with ``what`` if it is not set within ``timeout``."""
    assert event.wait(timeout), f"timed out after {timeout} s waiting for {what}"


class InThread:
    """Run ``fn`` in a thread; :meth:`result` joins it (with a deadline) and returns or raises."""

    def __init__(self, fn: Callable[[], Any], name: str | None = None) -> None:
        self._fn = fn
        self._box: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._box["result"] = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed back by result()
            self._box["error"] = exc

    def result(self, timeout: float = DEADLINE) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"thread {self.thread.name} still running"
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("result")


# -- the kernel's view -------------------------------------------------------------------------


def flock_waiters(lock_file: Path) -> set[int]:
    """Pids that ``/proc/locks`` lists as blocked waiting for a flock on ``lock_file``."""
    st = os.stat(lock_file)
    pids: set[int] = set()
    with open("/proc/locks") as table:
        for line in table:
            fields = line.split()
            # "N: -> FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
            waiting = len(fields) >= 7 and fields[1] == "->" and fields[2] == "FLOCK"
            if waiting and int(fields[6].rsplit(":", 1)[1]) == st.st_ino:
                pids.add(int(fields[5]))
    return pids


def wait_until_blocked(lock_files: Iterable[Path], pid: int, timeout: float = DEADLINE) -> None:
    """Return once process ``pid`` waits in the kernel for a flock on any of ``lock_files``.

    The kernel shows a blocked flock only in ``/proc/locks``, so this watches
    that table with a deadline: it observes the state the test needs.
    """
    files = list(lock_files)
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while not any(pid in flock_waiters(f) for f in files):
        assert time.monotonic() < deadline, f"pid {pid} never blocked on {files}"
        pause.wait(0.002)


# -- an audit log: O_APPEND lines that record who was inside when ------------------------------


def audit(path: Path, line: str) -> None:
    """Append one line in a single ``write`` to an ``O_APPEND`` file (atomic in order)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_audit(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def max_inside(entries: Iterable[list[str]]) -> int:
    """From ``enter``/``exit`` audit lines: the most holders inside at once (asserting pairs)."""
    inside: set[str] = set()
    most = 0
    for entry in entries:
        what, who = entry[0], entry[1]
        if what == "enter":
            assert who not in inside, f"{who} entered twice"
            inside.add(who)
            most = max(most, len(inside))
        else:
            assert what == "exit"
            assert who in inside, f"{who} left without entering"
            inside.remove(who)
    assert not inside, f"never left: {inside}"
    return most


# -- child targets: workspace and backend ------------------------------------------------------


def hold_lock(
    lock: WorkspaceLock | BackendLock | PackLock | ManifestLock,
    held: MpEvent,
    release: MpEvent,
) -> int:
    """Hold ``lock`` exclusively until ``release`` is set; return this pid."""
    with lock:
        held.set()
        release.wait(BACKSTOP)
    return os.getpid()


def try_lock(lock: WorkspaceLock | BackendLock | PackLock | ManifestLock) -> str:
    """``"acquired"`` or the class name of what ``try_acquire`` raised."""
    try:
        hold = lock.try_acquire()
    except LockBusy as exc:
        return type(exc).__name__
    hold.release()
    return "acquired"


def attempt_sync(workspace: Path) -> list[tuple[str, str]]:
    """A second "sync": every way of taking the workspace lock; (error class, message) each."""
    lock = WorkspaceLock(workspace)
    outcomes: list[tuple[str, str]] = []
    attempts: list[Callable[[], Any]] = [
        lock.try_acquire,
        lambda: lock.acquire(timeout=BACKSTOP),
        lock.acquire,
        lock.__enter__,
    ]
    for attempt in attempts:
        try:
            attempt()
        except LockError as exc:
            outcomes.append((type(exc).__name__, str(exc)))
        else:
            lock.release()
            outcomes.append(("acquired", ""))
    return outcomes


def fetch_repeatedly(dest: Path, log: Path, rounds: int, start: MpBarrier) -> int:
    """Fetch into ``dest`` ``rounds`` times under its BackendLock, wiping it each time."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    lock = BackendLock(dest)
    for n in range(rounds):
        with lock.acquire(timeout=DEADLINE):
            audit(log, f"enter {me}")
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            (dest / "HEAD").write_text(f"{me} {n}\n")
            audit(log, f"exit {me}")
    return os.getpid()


# -- child targets: manifest -------------------------------------------------------------------


def manifest_line(worker: str, seq: int) -> bytes:
    """One JSON line, padded so that writing it in pieces could tear it."""
    return (json.dumps({"worker": worker, "seq": seq, "pad": "x" * 500}) + "\n").encode()


def append_line(data: Path, line: bytes) -> None:
    """Append ``line`` in three ``write`` calls: only the lock keeps it whole."""
    fd = os.open(data, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        third = len(line) // 3
        for piece in (line[:third], line[third : 2 * third], line[2 * third :]):
            os.write(fd, piece)
    finally:
        os.close(fd)


def append_under_write(
    lock: ManifestLock, data: Path, worker: str, count: int, start: MpBarrier
) -> int:
    """Append ``count`` lines to ``data``, each under ``lock.write()``."""
    start.wait(DEADLINE)
    for seq in range(count):
        with lock.write(timeout=DEADLINE):
            append_line(data, manifest_line(worker, seq))
    return count


def check_whole_lines(text: bytes) -> int:
    """Assert ``text`` is nothing but whole JSON lines; return how many."""
    if not text:
        return 0
    assert text.endswith(b"\n"), f"a torn last line: {text[-80:]!r}"
    lines = text.split(b"\n")[:-1]
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"worker", "seq", "pad"}, line[:80]
    return len(lines)


def read_until(lock: ManifestLock, data: Path, stop: MpEvent | threading.Event) -> int:
    """Read ``data`` under ``lock.read()`` until ``stop``; every read must see whole lines.

    Returns how many reads were made (the last one after ``stop`` was set).
    """
    reads = 0
    while True:
        finished = stop.is_set()
        with lock.read(timeout=DEADLINE):
            text = data.read_bytes() if data.exists() else b""
        check_whole_lines(text)
        reads += 1
        if finished:
            return reads


def read_together(lock: ManifestLock, everyone_inside: MpBarrier) -> int:
    """Be inside ``lock.read()`` at the same moment as every other party of the barrier."""
    with lock.read(timeout=DEADLINE):
        everyone_inside.wait(DEADLINE)
        assert lock.held
    return os.getpid()


def try_read(lock: ManifestLock) -> str:
    """``"acquired"`` or the class name of what ``lock.read(timeout=0)`` raised."""
    try:
        hold = lock.read(timeout=0)
    except LockError as exc:
        return type(exc).__name__
    hold.release()
    return "acquired"


def read_then_note_exit(lock: ManifestLock, log: Path, held: MpEvent, release: MpEvent) -> int:
    """Hold ``lock.read()`` until ``release``; log ``reader-exit`` while still inside."""
    with lock.read(timeout=DEADLINE):
        held.set()
        release.wait(BACKSTOP)
        audit(log, "reader-exit")
    return os.getpid()


# -- child targets: scheduler ------------------------------------------------------------------


def hold_permit(scheduler: Scheduler, held: MpEvent, release: MpEvent) -> str:
    """Hold a permit until ``release``; return its slot file."""
    with scheduler.acquire(timeout=DEADLINE) as permit:
        held.set()
        release.wait(BACKSTOP)
        return str(permit.slot)


def hold_permits_in_threads(
    scheduler: Scheduler, count: int, held: MpEvent, release: MpEvent
) -> int:
    """Hold ``count`` permits, one per thread, until ``release``."""
    ready = threading.Barrier(count + 1)

    def one() -> None:
        with scheduler.acquire(timeout=DEADLINE):
            ready.wait(DEADLINE)
            release.wait(BACKSTOP)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    ready.wait(DEADLINE)
    held.set()
    for thread in threads:
        thread.join(BACKSTOP + DEADLINE)
    return count


def run_under_permits(scheduler: Scheduler, log: Path, rounds: int, start: MpBarrier) -> int:
    """Take a permit ``rounds`` times, logging enter/exit (and the slot) while holding it."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    for _ in range(rounds):
        with scheduler.acquire(timeout=DEADLINE) as permit:
            assert permit.slot is not None
            audit(log, f"enter {me} {permit.slot.name}")
            audit(log, f"exit {me} {permit.slot.name}")
    return rounds


def permit_in_pool(scheduler: Scheduler) -> tuple[int, str, int | None, str]:
    """In a pool worker: (pid, slot name, max_parallelism, what try_acquire did)."""
    try:
        permit = scheduler.try_acquire()
    except LockBusy:
        return os.getpid(), "", scheduler.max_parallelism, "LockBusy"
    with permit:
        assert permit.slot is not None
        return os.getpid(), permit.slot.name, scheduler.max_parallelism, "acquired"


# -- child targets: the whole chain ------------------------------------------------------------


FiveLocks = tuple[WorkspaceLock, Scheduler, PackLock, BackendLock, ManifestLock]


def hold_one_of_each(locks: FiveLocks, held: MpEvent, release: MpEvent) -> int:
    """Hold one lock of every tier, outer to inner, until ``release``."""
    workspace, scheduler, pack, backend, manifest = locks
    with (
        workspace,
        scheduler.acquire(timeout=DEADLINE),
        pack.acquire(timeout=DEADLINE),
        backend.acquire(timeout=DEADLINE),
        manifest.write(timeout=DEADLINE),
    ):
        held.set()
        release.wait(BACKSTOP)
    return os.getpid()


@dataclass(frozen=True)
class Workspace:
    """What every pack operation of one sync shares (it pickles to pool workers)."""

    scheduler: Scheduler
    manifest: ManifestLock
    events: Path
    packs: Path
    repos: Path


def pack_operation(workspace: Workspace, tree: str, pack: str, op: int) -> dict[str, Any]:
    """One pack operation as a grex sync takes it: slot → pack → backend → manifest.

    Appends an event with the pack's start and end (``time.monotonic``, one
    clock for every process) under ``ManifestLock.write()``, and returns it.
    """
    pack_dir, dest = workspace.packs / pack, workspace.repos / pack
    with workspace.scheduler.acquire(timeout=DEADLINE) as permit:
        assert permit.slot is not None
        with (
            PackLock(pack_dir).acquire(timeout=DEADLINE),
            BackendLock(dest).acquire(timeout=DEADLINE),
        ):
            start = time.monotonic()
            # The "fetch": wipe and re-create the checkout, as a clone would.
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for n in range(100):
                (dest / f"object-{n}").write_text(f"{tree} {op} {n}\n")
            (dest / "HEAD").write_text(f"{tree} {op}\n")
            marker = pack_dir / "last-op"
            marker.write_text(f"{op}\n")
            assert marker.read_text() == f"{op}\n", "another operation wrote into this pack"
            end = time.monotonic()
            event = {
                "tree": tree,
                "pack": pack,
                "op": op,
                "pid": os.getpid(),
                "slot": permit.slot.name,
                "start": start,
                "end": end,
            }
            with workspace.manifest.write(timeout=DEADLINE), workspace.events.open("a") as log:
                log.write(json.dumps(event) + "\n")
    return event


# -- child targets: acquire_all ----------------------------------------------------------------


def acquire_all_repeatedly(locks: list[PackLock], log: Path, rounds: int, start: MpBarrier) -> int:
    """Take ``locks`` together ``rounds`` times, logging enter/exit while holding them."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    for _ in range(rounds):
        with acquire_all(locks, timeout=DEADLINE):
            audit(log, f"enter {me}")
            audit(log, f"exit {me}")
    return rounds
