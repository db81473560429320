"""The libraries the benchmark compares, and the worker processes that drive them.

Every adapter locks one *pack directory* and is driven the same way:
``acquire(timeout=None, cancel=None)`` blocks until it holds the lock (True)
or until the timeout or the cancel event ends the wait (False);
``release()`` lets go. An adapter whose library cannot do something says so
in its class attributes instead of faking it. To add a library, write a
subclass of :class:`Peer` and add one line to :data:`PEERS`.

A library that has no "wait forever" (the polling peers) waits at most
:data:`MAX_WAIT` seconds, so the benchmark never hangs on them.

The second half is both ends of the pipe to a worker process: the commands a
worker runs (``w_*``), and :class:`Workers`, the parent's handle on a few
spawned workers, whose every wait has a deadline.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import gc
import hashlib
import importlib
import inspect
import mmap
import multiprocessing
import os
import resource
import signal
import statistics
import threading
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import fasteners  # type: ignore[import-untyped]
import filelock
import portalocker
import portalocker.utils

grex_locks: ModuleType | None
#: Why ``grex_locks`` could not be imported ("" when it was): the bench says so instead of dying.
GREX_IMPORT_ERROR = ""
try:
    import grex_locks
except Exception as exc:  # noqa: BLE001 - a half-rewritten library must not stop the peers' run
    grex_locks = None
    GREX_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def grex_fingerprint() -> str:
    """Where the grex_locks in use lives and a hash of its source files' bytes."""
    if grex_locks is None or grex_locks.__file__ is None:
        return "not importable"
    package = Path(grex_locks.__file__).parent
    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return f"{package} #{digest.hexdigest()[:12]}"


#: What the parent imported: every worker must have imported the same (see :class:`Workers`).
GREX_FINGERPRINT = grex_fingerprint()

#: The longest any benchmark acquire waits; a wait this long is reported as a failure.
MAX_WAIT = 60.0
#: Deadline for a worker command that does not wait for a lock.
QUICK_CALL = 30.0
#: The process counts of the contention scenario (one barrier each).
PROCESS_COUNTS = (2, 4, 8)
#: The many-packs scenario alternates grex and raw packs in this many chunks.
CHUNKS = 10
#: The lock file the peers use inside a pack directory (grex_locks uses its own name).
PEER_LOCK_FILE = "peer.lock"

_PL_EXCLUSIVE = portalocker.LockFlags.EXCLUSIVE
_PL_SHARED = portalocker.LockFlags.SHARED


def _wait(timeout: float | None) -> float:
    return MAX_WAIT if timeout is None else timeout


class Peer:
    """One library's lock on one pack directory."""

    #: Seconds between two tries while waiting; 0.0 means the kernel wakes the waiter.
    poll_period: ClassVar[float] = 0.0
    #: Whether ``acquire(timeout=...)`` is honoured.
    can_timeout: ClassVar[bool] = True
    #: Whether ``acquire(cancel=...)`` is honoured.
    can_cancel: ClassVar[bool] = False
    #: Why several objects on one path in one process do not exclude each other ("" if they do).
    thread_unsafe: ClassVar[str] = ""
    #: The ``grex_locks`` attribute the adapter needs ("" for the peers).
    needs: ClassVar[str] = ""

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        self.pack = pack
        self.shared = shared

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the adapter keeps open between cycles."""


class RawFlock(Peer):
    """``fcntl.flock`` on a descriptor opened once: the floor."""

    can_timeout = False

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._fd = os.open(pack / PEER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        fcntl.flock(self._fd, self._op)
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class PortalockerPolling(Peer):
    """``portalocker.Lock``: opens the file, tries non-blocking, sleeps, retries."""

    poll_period = float(portalocker.utils.DEFAULT_CHECK_INTERVAL)

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        flags = (_PL_SHARED if shared else _PL_EXCLUSIVE) | portalocker.LockFlags.NON_BLOCKING
        self._lock = portalocker.Lock(pack / PEER_LOCK_FILE, timeout=MAX_WAIT, flags=flags)

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        try:
            self._lock.acquire(timeout=_wait(timeout))
        except portalocker.LockException:
            return False
        return True

    def release(self) -> None:
        self._lock.release()


class PortalockerBlocking(Peer):
    """``portalocker.lock(fh, LOCK_EX)`` on a file opened once: the kernel wakes the waiter."""

    can_timeout = False

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._file = open(pack / PEER_LOCK_FILE, "a")  # noqa: SIM115 - kept open across cycles
        self._flags = _PL_SHARED if shared else _PL_EXCLUSIVE

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        portalocker.lock(self._file, self._flags)
        return True

    def release(self) -> None:
        portalocker.unlock(self._file)

    def close(self) -> None:
        self._file.close()


class FileLock(Peer):
    """``filelock.FileLock``: flock, polling every 50 ms while contended."""

    poll_period = 0.05
    can_cancel = "cancel_check" in inspect.signature(filelock.FileLock.acquire).parameters

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._lock = filelock.FileLock(pack / PEER_LOCK_FILE, poll_interval=self.poll_period)

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        extra: dict[str, Any] = {"cancel_check": cancel.is_set} if cancel is not None else {}
        try:
            self._lock.acquire(timeout=_wait(timeout), **extra)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        self._lock.release()


class Fasteners(Peer):
    """``fasteners.InterProcessLock``: ``lockf``, backing off from 10 ms to 100 ms."""

    poll_period = 0.1
    thread_unsafe = "lockf(3) locks belong to the process, so its threads all hold them at once"

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._lock = fasteners.InterProcessLock(str(pack / PEER_LOCK_FILE))

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        return bool(self._lock.acquire(timeout=_wait(timeout)))

    def release(self) -> None:
        self._lock.release()


class FastenersRW(Peer):
    """``fasteners.InterProcessReaderWriterLock``: ``lockf`` shared or exclusive, polling."""

    poll_period = 0.1
    thread_unsafe = Fasteners.thread_unsafe

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._lock = fasteners.InterProcessReaderWriterLock(str(pack / PEER_LOCK_FILE))

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        take = self._lock.acquire_read_lock if self.shared else self._lock.acquire_write_lock
        return bool(take(timeout=_wait(timeout)))

    def release(self) -> None:
        if self.shared:
            self._lock.release_read_lock()
        else:
            self._lock.release_write_lock()


class GrexPack(Peer):
    """``grex_locks.PackLock``, waiting without a timeout unless one is given."""

    can_cancel = True
    needs = "PackLock"
    arm_timeout: ClassVar[bool] = False

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        assert grex_locks is not None
        self._lock = grex_locks.PackLock(pack)

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        assert grex_locks is not None
        if timeout is None and self.arm_timeout:
            timeout = MAX_WAIT
        try:
            self._lock.acquire(timeout=timeout, cancel=cancel)
        except (grex_locks.LockTimeout, grex_locks.LockCancelled):
            return False
        return True

    def release(self) -> None:
        self._lock.release()


class GrexPackTimeout(GrexPack):
    """``grex_locks.PackLock`` with ``timeout=`` always armed (the cancellable wait)."""

    arm_timeout = True


class GrexPackCancel(GrexPack):
    """``grex_locks.PackLock`` with ``cancel=`` always armed (an event that is never set)."""

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        self._never = threading.Event()

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        return super().acquire(timeout, self._never if cancel is None else cancel)


class GrexManifest(Peer):
    """``grex_locks.ManifestLock``: ``read()`` or ``write()``."""

    can_cancel = True
    needs = "ManifestLock"

    def __init__(self, pack: Path, *, shared: bool = False) -> None:
        super().__init__(pack, shared=shared)
        assert grex_locks is not None
        self._lock = grex_locks.ManifestLock(pack / "manifest.lock")
        self._hold: AbstractContextManager[object] | None = None

    def acquire(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        assert grex_locks is not None
        enter = self._lock.read if self.shared else self._lock.write
        try:
            hold = enter(timeout=timeout, cancel=cancel)
            hold.__enter__()
        except (grex_locks.LockTimeout, grex_locks.LockCancelled):
            return False
        self._hold = hold
        return True

    def release(self) -> None:
        hold, self._hold = self._hold, None
        assert hold is not None
        hold.__exit__(None, None, None)


@dataclass(frozen=True)
class Spec:
    """How to build one benchmarked lock: a label, an adapter class, shared or not."""

    label: str
    cls: type[Peer]
    shared: bool = False


#: Every lock the benchmark knows, by the key used in its JSON output.
PEERS: dict[str, Spec] = {
    "flock": Spec("raw fcntl.flock", RawFlock),
    "portalocker": Spec("portalocker.Lock (polling)", PortalockerPolling),
    "portalocker-blocking": Spec("portalocker.lock (blocking)", PortalockerBlocking),
    "filelock": Spec("filelock.FileLock", FileLock),
    "fasteners": Spec("fasteners.InterProcessLock", Fasteners),
    "grex": Spec("grex_locks PackLock", GrexPack),
    "grex+timeout": Spec("grex_locks PackLock, timeout armed", GrexPackTimeout),
    "grex+cancel": Spec("grex_locks PackLock, cancel armed", GrexPackCancel),
    # shared / exclusive pairs for the readers-writer comparison
    "flock-sh": Spec("raw fcntl.flock LOCK_SH", RawFlock, shared=True),
    "flock-ex": Spec("raw fcntl.flock LOCK_EX", RawFlock),
    "portalocker-sh": Spec("portalocker.Lock SHARED", PortalockerPolling, shared=True),
    "portalocker-ex": Spec("portalocker.Lock EXCLUSIVE", PortalockerPolling),
    "fasteners-r": Spec("fasteners RW lock, read", FastenersRW, shared=True),
    "fasteners-w": Spec("fasteners RW lock, write", FastenersRW),
    "grex-read": Spec("grex_locks ManifestLock.read()", GrexManifest, shared=True),
    "grex-write": Spec("grex_locks ManifestLock.write()", GrexManifest),
}


def grex_has(*names: str) -> bool:
    """Whether the grex_locks being benchmarked already offers every one of ``names``."""
    return grex_locks is not None and all(hasattr(grex_locks, name) for name in names)


def available(key: str) -> bool:
    """Whether the lock ``key`` can be built in this checkout."""
    needs = PEERS[key].cls.needs
    return not needs or grex_has(needs)


def make(key: str, pack: Path) -> Peer:
    """Build the lock ``key`` on the pack directory ``pack`` (created if missing)."""
    spec = PEERS[key]
    pack.mkdir(parents=True, exist_ok=True)
    return spec.cls(pack, shared=spec.shared)


def label(key: str) -> str:
    return PEERS[key].label


# ---------------------------------------------------------------- worker side


class WorkerState:
    """What one worker process keeps between commands: its adapters and its pipe."""

    def __init__(self, conn: Connection, barriers: dict[int, Barrier]) -> None:
        self.conn = conn
        self.barriers = barriers
        self.peers: dict[tuple[str, str], Peer] = {}
        self.kept: list[Any] = []

    def peer(self, key: str, pack: str) -> Peer:
        if (key, pack) not in self.peers:
            self.peers[key, pack] = make(key, Path(pack))
        return self.peers[key, pack]


def _increment(fd: int) -> None:
    value = int(os.pread(fd, 20, 0) or b"0")
    os.pwrite(fd, b"%20d" % (value + 1), 0)


def read_counter(path: Path) -> int:
    return int(path.read_bytes() or b"0")


def w_hold(st: WorkerState, key: str, pack: str) -> int:
    if not st.peer(key, pack).acquire():
        raise TimeoutError(f"{key}: could not take the lock to hold it")
    return os.getpid()


def w_release(st: WorkerState, key: str, pack: str) -> float:
    peer = st.peer(key, pack)
    t0 = time.monotonic()
    peer.release()
    return t0


def w_wait(st: WorkerState, key: str, pack: str) -> float:
    """Block until the lock is free; report the moment it was granted."""
    peer = st.peer(key, pack)
    st.conn.send(("note", time.monotonic()))
    if not peer.acquire():
        raise TimeoutError(f"{key}: waited {MAX_WAIT} s for the handoff")
    granted = time.monotonic()
    peer.release()
    return granted


def w_contend(
    st: WorkerState, key: str, pack: str, *, counter: str, n: int, seconds: float
) -> dict[str, Any]:
    peer = make(key, Path(pack))
    fd = os.open(counter, os.O_RDWR)
    waits = array("d")
    try:
        st.barriers[n].wait(QUICK_CALL)
        start = time.monotonic()
        end = start + seconds
        now = start
        while now < end:
            if not peer.acquire():
                raise TimeoutError(f"{key}: waited {MAX_WAIT} s under contention")
            got = time.monotonic()
            waits.append(got - now)
            _increment(fd)
            peer.release()
            now = time.monotonic()
        return {"cycles": len(waits), "waits": waits.tobytes(), "start": start, "end": now}
    finally:
        os.close(fd)
        peer.close()


def w_timeout_once(st: WorkerState, key: str, pack: str, timeout: float) -> float:
    peer = st.peer(key, pack)
    start = time.monotonic()
    got = peer.acquire(timeout=timeout)
    overshoot = time.monotonic() - start - timeout
    if got:
        peer.release()
        raise RuntimeError(f"{key}: acquired a lock another process holds")
    return overshoot


def w_cancel_once(st: WorkerState, key: str, pack: str, after: float) -> float:
    peer = st.peer(key, pack)
    cancel = threading.Event()
    set_at: list[float] = []

    def setter() -> None:
        time.sleep(after)
        set_at.append(time.monotonic())
        cancel.set()

    thread = threading.Thread(target=setter, daemon=True)
    thread.start()
    got = peer.acquire(cancel=cancel)
    returned = time.monotonic()
    thread.join(QUICK_CALL)
    if got:
        peer.release()
        raise RuntimeError(f"{key}: acquired a lock another process holds")
    return returned - set_at[0]


def w_threads(
    st: WorkerState,
    key: str,
    pack: str,
    *,
    counter: str,
    n: int,
    seconds: float,
    cpu: int | None = None,
) -> dict[str, Any]:
    """``n`` threads, each with its own lock object on one path, incrementing one counter.

    ``cpu``: the threads run on that CPU only (they inherit this thread's
    affinity, which is restored afterwards), so that no hand-off crosses CPUs.
    """
    if cpu is not None:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            return w_threads(st, key, pack, counter=counter, n=n, seconds=seconds)
        finally:
            os.sched_setaffinity(0, allowed)
    peers = [make(key, Path(pack)) for _ in range(n)]
    fd = os.open(counter, os.O_RDWR)
    guard = threading.Lock()
    inside = [0]
    overlaps = [0]
    cycles = [0] * n
    errors: list[str] = []
    start = threading.Barrier(n, timeout=QUICK_CALL)

    def run(i: int) -> None:
        try:
            start.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if not peers[i].acquire():
                    errors.append("acquire timed out")
                    return
                with guard:
                    inside[0] += 1
                    overlaps[0] += inside[0] > 1
                _increment(fd)
                with guard:
                    inside[0] -= 1
                peers[i].release()
                cycles[i] += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this library's failure
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + MAX_WAIT)
    elapsed = time.monotonic() - began
    hung = any(thread.is_alive() for thread in threads)
    final = int(os.pread(fd, 20, 0) or b"0")
    os.close(fd)
    if not hung:
        for peer in peers:
            peer.close()
    return {
        "cycles": cycles,
        "final": final,
        "overlaps": overlaps[0],
        "errors": errors[:3],
        "hung": hung,
        "elapsed": elapsed,
    }


# ---------------------------------------------------------------- floors


def spin(iterations: int) -> None:
    """Pure-Python busy work: the loop the floors' hot paths run inline (W and G µs)."""
    for _ in range(iterations):
        pass


def w_spin_rate(st: WorkerState, iterations: int, tries: int) -> dict[str, float]:
    """Loop iterations of :func:`spin` per µs: the fastest of ``tries`` timings, and the median."""
    spin(iterations)  # warm-up
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        spin(iterations)
        times.append(time.perf_counter() - start)
    return {
        "per_us": iterations / (min(times) * 1e6),
        "median_per_us": iterations / (statistics.median(times) * 1e6),
        "iterations": iterations,
        "tries": tries,
    }


#: A nanosecond clock on the system-wide CLOCK_MONOTONIC: ``perf_counter_ns`` where it is that
#: clock (Linux), so a waiter's timings and its reported grant compare with another process's.
NS_CLOCK: Callable[[], int] = (
    time.perf_counter_ns
    if time.get_clock_info("perf_counter").implementation
    == time.get_clock_info("monotonic").implementation
    else time.monotonic_ns
)


def w_spin_ns(st: WorkerState, iterations: int, tries: int) -> list[int]:
    """ns of ``spin(iterations)`` timed as the hand-off floor's waiter times it, but warm.

    The same clock reads around the same call, ``tries`` times back to back after a warm-up.
    """
    clock = NS_CLOCK
    for _ in range(10):
        spin(iterations)
    took = []
    for _ in range(tries):
        start = clock()
        spin(iterations)
        took.append(clock() - start)
    return took


def w_release_work(st: WorkerState, key: str, pack: str, work: int) -> tuple[float, int]:
    """``release`` with ``work`` spin iterations between deciding to let go and letting go.

    Returns the moment it decided (the hand-off's start, in seconds on CLOCK_MONOTONIC)
    and the ns its loop took.
    """
    peer = st.peer(key, pack)
    clock = NS_CLOCK
    start = clock()
    spin(work)
    end = clock()
    peer.release()
    return start / 1e9, end - start


def w_wait_work(st: WorkerState, key: str, pack: str, work: int) -> tuple[float, int]:
    """``wait`` with ``work`` spin iterations right after the grant, before reporting it.

    Returns the moment the waiter was done (seconds on CLOCK_MONOTONIC) and the ns its loop
    took, timed around the loop only: what that code costs right after a wake.
    """
    peer = st.peer(key, pack)
    clock = NS_CLOCK
    st.conn.send(("note", time.monotonic()))
    if not peer.acquire():
        raise TimeoutError(f"{key}: waited {MAX_WAIT} s for the handoff")
    start = clock()
    spin(work)
    end = clock()
    peer.release()
    return end / 1e9, end - start


def w_wait_helper(st: WorkerState, key: str, pack: str) -> float:
    """``wait``, blocking in a helper thread's flock as any wait that can give up must.

    A blocking ``flock`` cannot be interrupted, so a wait with a timeout or a cancel
    event lets a helper thread block in it; the helper then wakes the caller (a bare
    ``_thread`` lock) and yields the interpreter to it. Reports the moment the caller
    had the lock: the floor under any interruptible hand-off.
    """
    peer = st.peer(key, pack)
    woken = _thread.allocate_lock()
    woken.acquire()

    def wait_in_kernel() -> None:
        peer.acquire()
        woken.release()
        time.sleep(0)  # the caller, not this thread's teardown, gets the interpreter

    threading.Thread(target=wait_in_kernel, daemon=True).start()
    st.conn.send(("note", time.monotonic()))
    if not woken.acquire(True, MAX_WAIT):
        raise TimeoutError(f"{key}: waited {MAX_WAIT} s for the handoff (helper thread)")
    granted = time.monotonic()
    peer.release()
    return granted


def w_baton(st: WorkerState, n: int, seconds: float, *, before: int, after: int) -> dict[str, Any]:
    """``n`` threads pass a baton round-robin through bare ``_thread`` locks.

    Thread i blocks on its own lock, runs ``before`` spin iterations (work inside its turn),
    wakes thread i+1 by releasing that one's lock, then runs ``after`` iterations (a releasing
    thread going back to its caller and coming back for the lock) before blocking again.
    Every acquire has a deadline; the threads are daemons, joined with a deadline too.
    """
    locks = [_thread.allocate_lock() for _ in range(n)]
    work_before, work_after = range(before), range(after)  # built once: an empty one is ~40 ns
    for lock in locks:
        lock.acquire()
    stop = [False]
    count = [0]
    errors: list[str] = []

    def run(i: int) -> None:
        me, nxt = locks[i], locks[(i + 1) % n]
        try:
            while True:
                if not me.acquire(timeout=QUICK_CALL):
                    errors.append(f"thread {i}: no baton within {QUICK_CALL:.0f} s")
                    return
                for _ in work_before:
                    pass
                if stop[0]:
                    nxt.release()  # pass the news on: every thread wakes once more, and ends
                    return
                count[0] += 1
                nxt.release()
                for _ in work_after:
                    pass
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    locks[0].release()
    time.sleep(seconds)
    stop[0] = True
    elapsed = time.monotonic() - began
    handoffs = count[0]
    deadline = time.monotonic() + QUICK_CALL + 5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    return {"handoffs": handoffs, "elapsed": elapsed, "errors": errors[:3], "hung": hung}


def w_flock_floor(
    st: WorkerState, lock: str, state: str, *, n: int, index: int, seconds: float, gap: int
) -> dict[str, Any]:
    """One of ``n`` processes: flock(LOCK_EX), note the holder, LOCK_UN, ``gap`` spin iterations.

    While holding, the process reads the last holder's id from a shared mapping of ``state``
    and writes its own when it differs: a cross-process hand-off.
    """
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    sfd = os.open(state, os.O_RDWR | os.O_CLOEXEC)
    try:
        shared = mmap.mmap(sfd, mmap.PAGESIZE)
    finally:
        os.close(sfd)
    me = index + 1
    work = range(gap)  # built once: an empty one costs ~40 ns
    cycles = cross = 0
    flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
    try:
        st.barriers[n].wait(QUICK_CALL)
        start = time.monotonic()
        end = start + seconds
        while True:
            flock(fd, ex)
            if shared[0] != me:
                cross += 1
                shared[0] = me
            flock(fd, un)
            cycles += 1
            for _ in work:
                pass
            if not cycles & 63 and time.monotonic() >= end:  # the clock every 64th cycle only
                break
        stopped = time.monotonic()
    finally:
        shared.close()
        os.close(fd)
    return {"cycles": cycles, "cross": cross, "start": start, "end": stopped}


def w_hold_packs(st: WorkerState, packs: list[str]) -> int:
    """Hold grex PackLocks on all of ``packs`` (tier check off: they share one tier)."""
    assert grex_locks is not None
    grex_locks.set_tier_check("off")
    for pack in packs:
        lock = grex_locks.PackLock(pack)
        lock.acquire(timeout=QUICK_CALL)
        st.kept.append(lock)
    return os.getpid()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _registry_size() -> int | None:
    try:
        gate = importlib.import_module("grex_locks._core.gate")
    except ImportError:
        return None
    size = getattr(gate, "registry_size", None)
    return int(size()) if callable(size) else None


def _raw_pack(pack: Path) -> None:
    pack.mkdir()
    fd = os.open(pack / "raw.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def w_many_packs(st: WorkerState, root: str, n: int, n_raw: int) -> dict[str, Any]:
    """Take and release ``n`` distinct PackLocks in turn; report what is left behind."""
    assert grex_locks is not None
    base = Path(root)
    for i in range(100):  # let imports, caches and the allocator settle first
        with grex_locks.PackLock(base / f"warm{i}"):
            pass
    gc.collect()
    fds, rss, peak = _fd_count(), _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = [0]

    def grex_pack(i: int) -> None:
        assert grex_locks is not None
        with grex_locks.PackLock(base / f"{i:06d}"):
            pass
        done[0] = i + 1

    def raw_pack(i: int) -> None:  # the reference: what the file system alone costs per pack
        _raw_pack(base / f"raw{i:06d}")

    def lap(body: Callable[[int], None], total: int, chunk: int) -> float:
        start = time.perf_counter()
        for i in range(chunk * total // CHUNKS, (chunk + 1) * total // CHUNKS):
            body(i)
        return time.perf_counter() - start

    raw_s = grex_s = 0.0
    error = None
    try:
        for chunk in range(CHUNKS):  # interleaved, so a slow spell of the disk hits both
            raw_s += lap(raw_pack, n_raw, chunk)
            grex_s += lap(grex_pack, n, chunk)
    except grex_locks.LockError as exc:
        error = f"failed at pack {done[0]:,}: {exc}"
    gc.collect()
    return {
        "packs": done[0],
        "error": error,
        "us_per_pack": grex_s / max(1, done[0]) * 1e6,
        "raw_us_per_pack": raw_s / max(1, n_raw) * 1e6,
        "fds_before": fds,
        "fds_after": _fd_count(),
        "rss_growth_mb": (_rss() - rss) / 2**20,
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024,
        "registry": _registry_size(),
    }


#: Every thread grex_locks starts is named ``grex-locks-...``: how its helpers are counted.
HELPER_PREFIX = "grex-locks"
#: The slow-wait log's monitor: one per process, started by the first wait that blocks,
#: whatever the number of waits or slots; not a helper of any one wait.
SLOW_WAIT_MONITOR = "grex-locks-slow-waits"


def helper_names() -> list[str]:
    """The names of grex_locks' waiting helpers alive in this process now (not the monitor)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(HELPER_PREFIX) and t.name != SLOW_WAIT_MONITOR
    ]


class _SlotHolders:
    """Threads that each hold one permit until :meth:`release` lets them go."""

    def __init__(self, scheduler: Any, parallel: int) -> None:
        self._let_go = threading.Event()
        self._held = threading.Semaphore(0)
        self._errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._hold, args=(scheduler,), name=f"bench-holder-{i}")
            for i in range(parallel)
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        for _ in self._threads:
            if not self._held.acquire(timeout=QUICK_CALL):
                self._errors.append(f"no permit within {QUICK_CALL:.0f} s")
                break
        if self._errors:
            self.release()
            raise RuntimeError(f"could not hold every slot: {self._errors}")

    def _hold(self, scheduler: Any) -> None:
        try:
            permit = scheduler.acquire(timeout=QUICK_CALL)
        except Exception as exc:  # noqa: BLE001 - reported to the parent by the constructor
            self._errors.append(repr(exc))
            self._held.release()
            return
        self._held.release()
        self._let_go.wait()
        permit.release()

    def release(self) -> None:
        self._let_go.set()
        for thread in self._threads:
            thread.join(QUICK_CALL)


def w_hold_slots(st: WorkerState, slots_dir: str, parallel: int) -> int:
    """Hold every slot of ``Scheduler(parallel, slots_dir=...)``, one thread per permit."""
    assert grex_locks is not None
    scheduler = grex_locks.Scheduler(parallel, slots_dir=slots_dir)
    st.kept += [scheduler, _SlotHolders(scheduler, parallel)]
    return os.getpid()


def w_release_kept(st: WorkerState) -> None:
    """Give back everything ``w_hold_*`` took, newest first."""
    for item in reversed(st.kept):
        release = getattr(item, "release", None)
        if callable(release):
            release()
    st.kept.clear()


def _busy_scheduler(st: WorkerState, slots_dir: str, parallel: int) -> Any:
    """This worker's one scheduler on ``slots_dir`` (kept, so its slot files stay open)."""
    assert grex_locks is not None
    for item in st.kept:
        if isinstance(item, grex_locks.Scheduler) and str(item.slots_dir) == slots_dir:
            return item
    scheduler = grex_locks.Scheduler(parallel, slots_dir=slots_dir)
    st.kept.append(scheduler)
    return scheduler


def w_busy_try(st: WorkerState, slots_dir: str, parallel: int, tries: int) -> dict[str, Any]:
    """Time ``try_acquire()`` on a scheduler whose every slot another process holds."""
    assert grex_locks is not None
    scheduler = _busy_scheduler(st, slots_dir, parallel)
    seconds: list[float] = []
    outcomes: Counter[str] = Counter()
    for _ in range(tries):
        start = time.perf_counter()
        try:
            permit = scheduler.try_acquire()
        except grex_locks.LockBusy:
            outcome = "LockBusy"
        except grex_locks.LockError as exc:
            outcome = type(exc).__name__
        else:
            permit.release()
            outcome = "acquired"
        seconds.append(time.perf_counter() - start)
        outcomes[outcome] += 1
    return {"seconds": seconds, "outcomes": dict(outcomes), "helpers": len(helper_names())}


def w_busy_wait(
    st: WorkerState, slots_dir: str, parallel: int, n: int, timeout: float
) -> dict[str, Any]:
    """``n`` threads call ``acquire(timeout=...)`` at once on a scheduler with no free slot.

    Reports how long each call took, what it raised, and the most grex_locks helper
    threads (and threads in all) alive at any moment, sampled every 2 ms.
    """
    assert grex_locks is not None
    scheduler = _busy_scheduler(st, slots_dir, parallel)
    baseline = helper_names()
    threads_before = threading.active_count()
    took = [float("nan")] * n
    outcomes = [""] * n
    go = threading.Barrier(n + 1, timeout=QUICK_CALL)

    def run(i: int) -> None:
        assert grex_locks is not None
        go.wait()
        start = time.monotonic()
        try:
            permit = scheduler.acquire(timeout=timeout)
        except grex_locks.LockTimeout:
            outcomes[i] = "LockTimeout"
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this library's failure
            outcomes[i] = type(exc).__name__
        else:
            permit.release()
            outcomes[i] = "acquired"
        took[i] = time.monotonic() - start

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    go.wait()
    began = time.monotonic()
    peak: list[str] = baseline
    peak_all = threading.active_count()
    deadline = began + timeout + MAX_WAIT
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        names = helper_names()
        if len(names) > len(peak):
            peak = names
        peak_all = max(peak_all, threading.active_count())
        time.sleep(0.002)
    last = time.monotonic() - began
    hung = sum(thread.is_alive() for thread in threads)
    right_after = len(helper_names())
    time.sleep(0.5)
    return {
        "took": took,
        "last_return": last,
        "outcomes": dict(Counter(outcomes)),
        "hung": hung,
        "helpers_before": len(baseline),
        "helpers_peak": len(peak),
        "helpers_peak_names": dict(Counter(peak)),
        "threads_before": threads_before,
        "threads_peak": peak_all,
        "helpers_right_after": right_after,
        "helpers_after_0_5s": len(helper_names()),
    }


def w_helpers_drain(st: WorkerState, within: float) -> dict[str, Any]:
    """Wait up to ``within`` seconds for grex_locks' helper threads to end; say what is left."""
    start = time.monotonic()
    names = helper_names()
    while names and time.monotonic() - start < within:
        time.sleep(0.01)
        names = helper_names()
    return {"left": dict(Counter(names)), "seconds": time.monotonic() - start}


HANDLERS: dict[str, Callable[..., Any]] = {
    "hold": w_hold,
    "release": w_release,
    "wait": w_wait,
    "contend": w_contend,
    "wait_helper": w_wait_helper,
    "timeout_once": w_timeout_once,
    "cancel_once": w_cancel_once,
    "threads": w_threads,
    "spin_rate": w_spin_rate,
    "baton": w_baton,
    "flock_floor": w_flock_floor,
    "spin_ns": w_spin_ns,
    "release_work": w_release_work,
    "wait_work": w_wait_work,
    "hold_packs": w_hold_packs,
    "many_packs": w_many_packs,
    "hold_slots": w_hold_slots,
    "release_kept": w_release_kept,
    "busy_try": w_busy_try,
    "busy_wait": w_busy_wait,
    "helpers_drain": w_helpers_drain,
}


def worker_main(conn: Connection, barriers: dict[int, Barrier]) -> None:
    """Serve commands from the parent until told to exit or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    st = WorkerState(conn, barriers)
    conn.send(("ready", (os.getpid(), grex_fingerprint())))
    while True:
        try:
            cmd, args, kwargs = conn.recv()
        except EOFError:
            return
        if cmd == "exit":
            return
        try:
            result = HANDLERS[cmd](st, *args, **kwargs)
        except Exception:  # noqa: BLE001 - every failure goes back to the parent, with its traceback
            conn.send(("err", f"{cmd}{args!r}:\n{traceback.format_exc()}"))
        else:
            conn.send(("ok", result))


# ---------------------------------------------------------------- parent side


class WorkerError(RuntimeError):
    """A worker failed a command, died, or missed its deadline."""


class Workers:
    """A few spawned worker processes, each driven over its own pipe."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barriers = {n: ctx.Barrier(n) for n in PROCESS_COUNTS}
        self.procs: list[SpawnProcess] = []
        self.conns: list[Connection] = []
        try:
            for i in range(size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main, args=(child, self.barriers), name=f"bench-{i}", daemon=True
                )
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            ready = [self.recv(i, QUICK_CALL, "ready") for i in range(size)]
            self.pids = [pid for pid, _ in ready]
            for _, theirs in ready:
                if theirs != GREX_FINGERPRINT:
                    raise WorkerError(
                        f"a worker imported another grex_locks ({theirs}) than this run "
                        f"({GREX_FINGERPRINT}): its source changed during the run"
                    )
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, i: int, cmd: str, *args: Any, **kwargs: Any) -> None:
        self.conns[i].send((cmd, args, kwargs))

    def recv(self, i: int, timeout: float, kind: str = "ok") -> Any:
        conn = self.conns[i]
        try:
            if not conn.poll(timeout):
                raise WorkerError(f"worker {i} gave no answer within {timeout:.0f} s")
            got, payload = conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerError(f"worker {i} died ({exc!r})") from None
        if got == "err":
            raise WorkerError(payload)
        if got != kind:
            raise WorkerError(f"worker {i} answered {got!r}, expected {kind!r}")
        return payload

    def call(self, i: int, cmd: str, *args: Any, timeout: float = QUICK_CALL, **kwargs: Any) -> Any:
        self.send(i, cmd, *args, **kwargs)
        return self.recv(i, timeout)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].join(5)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit", (), {}))
        for proc in self.procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
        for conn in self.conns:
            conn.close()
