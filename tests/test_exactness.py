"""Diagnostics are exact: every answer, for every lock kind, matches who really holds the lock.

The chaos run (``scripts/stress.py``) measures exactness under SIGKILL and
SIGSTOP; these tests are its fast, deterministic counterpart, judged by the
same rules (``scripts/stress_exact.py``):

* processes and threads take known locks of every kind — pack (alone and
  through ``acquire_all``), workspace sync, backend, manifest (write and
  shared read), scheduler slot — and meet at a barrier; then every lock is
  diagnosed, by ``diagnose()`` and by ``scan()``, and each answer must be
  exact: ``HELD`` naming the holder's pid and thread (record and holders),
  ``HELD`` shared with every reader among the holders, ``FREE``, or
  ``STALE_RECORD`` for a killed holder's lock;
* ``fork`` pool workers hold pack locks under the parent's workspace lock:
  each is exact, and so is the parent's workspace lock, during and after;
* ``grex-locks run`` hands the lock to its command: ``HELD`` by ``run``, then
  ``ORPHANED`` with the command among the holders once ``run`` is killed,
  then ``STALE_RECORD`` once the command is gone;
* a live holder taking and releasing its lock in a loop is never called
  dead (``STALE_RECORD``), however the diagnosis falls across its holds;
* a short randomized chaos run has no miss.

No sleep synchronises anything: barriers, events and pipes do, each wait
with a deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import DEADLINE

from grex_locks import (
    BackendLock,
    ManifestLock,
    PackLock,
    Permit,
    Scheduler,
    WorkspaceLock,
    acquire_all,
    diagnose,
    scan,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from stress_exact import Expectation, judge  # noqa: E402 - after the scripts' path

#: One lock a thread takes: (kind, paths); kind is pack, group, workspace,
#: backend, write, read or permit (paths: the slots directory).
Step = tuple[str, list[str]]


def _take(step: Step) -> tuple[Any, list[Path]]:
    """Take one step's lock(s); return the hold and the lock files it covers."""
    kind, paths = step
    if kind == "pack":
        lock = PackLock(paths[0])
        return lock.acquire(timeout=DEADLINE), [lock.path]
    if kind == "group":
        locks = [PackLock(p) for p in paths]
        return acquire_all(locks, timeout=DEADLINE), [lock.path for lock in locks]
    if kind == "workspace":
        workspace = WorkspaceLock(paths[0])
        return workspace.acquire(), [workspace.path]
    if kind == "backend":
        backend = BackendLock(paths[0])
        return backend.acquire(timeout=DEADLINE), [backend.path]
    if kind in ("write", "read"):
        manifest = ManifestLock(paths[0])
        take = manifest.write if kind == "write" else manifest.read
        return take(timeout=DEADLINE), [manifest.path]
    permit = Scheduler(2, slots_dir=paths[0]).acquire(timeout=DEADLINE)
    assert isinstance(permit, Permit)
    assert permit.slot is not None
    return permit, [permit.slot]


def _hold(
    steps: list[Step],
    barrier: Any,
    release: Any,
    report: multiprocessing.queues.Queue[tuple[str, Any]],
) -> None:
    """In this thread: take ``steps``, report each, meet at the barrier, wait for release."""
    holds = []
    try:
        for step in steps:
            hold, paths = _take(step)
            holds.append(hold)
            report.put(("held", (threading.current_thread().name, os.getpid(), step[0], paths)))
        barrier.wait(DEADLINE)
        if not release.wait(DEADLINE):
            raise TimeoutError("never told to release")
    except BaseException:  # noqa: BLE001 - handed to the test
        report.put(("error", traceback.format_exc()))
        barrier.abort()
    finally:
        for hold in reversed(holds):
            hold.release()


def holder_process(
    plan: dict[str, list[Step]],
    barrier: Any,
    release: Any,
    report: multiprocessing.queues.Queue[tuple[str, Any]],
) -> None:
    """A child process: one named thread per entry of ``plan``, each holding its steps."""
    threads = [
        threading.Thread(target=_hold, args=(steps, barrier, release, report), name=name)
        for name, steps in plan.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3 * DEADLINE)


def take_and_die(path: str, ready: Any) -> None:
    """Take a backend lock and say so; the test SIGKILLs this process while it holds."""
    BackendLock(path).acquire(timeout=DEADLINE)
    ready.set()
    time.sleep(3 * DEADLINE)  # a backstop, never the synchronisation: the test kills it first


def _expect_held(lock: str, pid: int, thread: str, allowed: set[int] | None = None) -> Expectation:
    return Expectation(lock, "held", pid=pid, thread=thread, allowed=allowed or set())


def _check(expected: dict[Path, Expectation], stale: set[Path] | None = None) -> list[str]:
    """Diagnose each lock (one by one and by scan) and judge it; return every miss."""
    stale = stale or set()
    root = Path(os.path.commonpath([str(p.parent) for p in expected]))
    scanned = {Path(d.path): d for d in scan(root)}
    misses = []
    for path, expectation in expected.items():
        for method, diagnosis in (("diagnose", diagnose(path)), ("scan", scanned.get(path))):
            verdict, why = judge(expectation, diagnosis)
            state = getattr(getattr(diagnosis, "state", None), "name", None)
            if path in stale and state != "STALE_RECORD":
                verdict, why = "miss", f"{state}, expected STALE_RECORD"
            if verdict != "exact":
                shown = diagnosis.to_dict() if diagnosis is not None else None
                misses.append(
                    f"{method} {path}: expected {expectation.audit_says()}: {why}: {shown}"
                )
    return misses


def _expected(
    held: list[tuple[str, int, str, list[Path]]],
    ws: Path,
    slots: Path,
    free_pack: Path,
    repos: list[Path],
) -> dict[Path, Expectation]:
    """What every lock's diagnosis must be, from what the holders reported."""
    expected: dict[Path, Expectation] = {}
    readers: dict[int, str] = {}
    for thread, pid, kind, paths in held:
        for path in paths:
            if kind == "read":
                readers[pid] = thread
            else:
                expected[path] = _expect_held(path.name, pid, thread)
    expected[ws / ".grex.lock"] = Expectation("m", "shared", readers=readers, allowed=set(readers))
    expected[WorkspaceLock(ws).path] = _expect_held("ws", os.getpid(), "MainThread")
    taken_slot = next(p for _, _, kind, paths in held if kind == "permit" for p in paths)
    free_slot = slots / ("slot-1.lock" if taken_slot.name == "slot-0.lock" else "slot-0.lock")
    expected[free_slot] = Expectation("s", "free")
    expected[PackLock(free_pack).path] = Expectation("p", "free")
    expected[BackendLock(repos[1]).path] = Expectation("b1", "free")
    # A killed holder left its record behind: STALE_RECORD (checked by the caller).
    expected[BackendLock(repos[2]).path] = Expectation("b2", "free")
    return expected


@pytest.mark.timeout(60)
def test_every_lock_kind_held_at_a_barrier_is_diagnosed_exactly(tmp_path: Path) -> None:
    ws, slots = tmp_path / "ws", tmp_path / "slots"
    packs = [tmp_path / "packs" / f"p{i}" for i in range(4)]
    repos = [tmp_path / "repos" / f"r{i}" for i in range(3)]
    manifest = ws / ".grex.lock"
    for directory in (ws, slots, *packs):
        directory.mkdir(parents=True)
    plans = [
        {
            "holder-a0": [("pack", [str(packs[0])])],
            "holder-a1": [("permit", [str(slots)]), ("backend", [str(repos[0])])],
        },
        {
            "holder-b0": [("read", [str(manifest)])],
            "holder-b1": [("group", [str(packs[1]), str(packs[2])])],
        },
    ]
    context = multiprocessing.get_context("spawn")
    threads_in_children = sum(len(plan) for plan in plans)
    barrier = context.Barrier(threads_in_children + 2)  # + a reader thread here + the test
    release = context.Event()
    report: multiprocessing.queues.Queue[tuple[str, Any]] = context.Queue()
    # A killed holder leaves a record behind: its backend lock is STALE_RECORD.
    ready = context.Event()
    doomed = context.Process(target=take_and_die, args=(str(repos[2]), ready))
    doomed.start()
    assert ready.wait(DEADLINE), "the doomed holder never took its lock"
    os.kill(doomed.pid or 0, signal.SIGKILL)
    doomed.join(DEADLINE)
    children = [
        context.Process(target=holder_process, args=(plan, barrier, release, report))
        for plan in plans
    ]
    workspace = WorkspaceLock(ws).acquire()  # the test's main thread holds the workspace
    try:
        for child in children:
            child.start()
        reader = threading.Thread(
            target=_hold,
            args=([("read", [str(manifest)])], barrier, release, report),
            name="test-reader",
        )
        reader.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(DEADLINE)  # broken when a holder failed: its report says why
        held: list[tuple[str, int, str, list[Path]]] = []
        for _ in range(sum(len(steps) for plan in plans for steps in plan.values()) + 1):
            kind, what = report.get(timeout=DEADLINE)
            assert kind == "held", what
            held.append(what)
        expected = _expected(held, ws, slots, packs[3], repos)
        stale = BackendLock(repos[2]).path
        assert len(expected[manifest].readers) == 2
        misses = _check(expected, stale={stale})
    finally:
        release.set()
        workspace.release()
        for child in children:
            child.join(DEADLINE)
            if child.exitcode is None:
                child.kill()
    reader.join(DEADLINE)
    assert not misses, "\n".join(misses)


# -- fork pool workers under a held workspace lock ------------------------------------------

_pool_sync: tuple[Any, Any, Any] | None = None


def _pool_init(barrier: Any, release: Any, held: Any) -> None:
    global _pool_sync
    _pool_sync = (barrier, release, held)


def _pool_hold(pack: str, name: str) -> None:
    """A pool task: take ``pack``, say so, meet the test at the barrier, release when told."""
    assert _pool_sync is not None
    barrier, release, held = _pool_sync
    threading.current_thread().name = name
    with PackLock(pack).acquire(timeout=DEADLINE):
        held.put((pack, os.getpid(), name))
        barrier.wait(DEADLINE)
        if not release.wait(DEADLINE):
            raise TimeoutError("never told to release")


@pytest.mark.timeout(60)
def test_fork_pool_workers_under_the_workspace_lock_are_diagnosed_exactly(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    packs = [tmp_path / "packs" / f"p{i}" for i in range(2)]
    for directory in (ws, *packs):
        directory.mkdir(parents=True)
    context = multiprocessing.get_context("fork")
    barrier, release, held = context.Barrier(3), context.Event(), context.Queue()
    workspace = WorkspaceLock(ws)
    me, mine = os.getpid(), threading.current_thread().name
    with workspace.acquire():
        with ProcessPoolExecutor(
            2, mp_context=context, initializer=_pool_init, initargs=(barrier, release, held)
        ) as pool:
            names = [f"pool-task-{i}" for i in range(2)]
            futures = [
                pool.submit(_pool_hold, str(p), n) for p, n in zip(packs, names, strict=True)
            ]
            try:
                barrier.wait(DEADLINE)
                expected = {workspace.path: _expect_held("ws", me, mine)}
                for _ in packs:
                    pack, pid, name = held.get(timeout=DEADLINE)
                    expected[PackLock(pack).path] = _expect_held(Path(pack).name, pid, name)
                during = _check(expected)
            finally:
                release.set()
            for future in futures:
                future.result(timeout=DEADLINE)
        # The pool's workers have exited (normally): the parent's lock and record are intact.
        after = _check({workspace.path: _expect_held("ws", me, mine)})
    assert not during, "while the pool workers hold:\n" + "\n".join(during)
    assert not after, "after the pool:\n" + "\n".join(after)


# -- grex-locks run: HELD, then ORPHANED once run is killed, then STALE_RECORD ----------------

_COMMAND = "import sys; print('ready', flush=True); sys.stdin.read()"


def _read_line(stream: Any, deadline: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
    assert ready, "the command under grex-locks run never started"
    return bytes(stream.readline())


@pytest.mark.timeout(60)
def test_run_command_is_held_then_orphaned_then_stale(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    lock = PackLock(pack).path
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grex_locks",
            "run",
            str(pack),
            "--",
            sys.executable,
            "-c",
            _COMMAND,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert run.stdin is not None
    assert run.stdout is not None
    try:
        deadline = time.monotonic() + DEADLINE
        assert _read_line(run.stdout, deadline) == b"ready\n"
        command = _command_of(run.pid)
        held = _check({lock: _expect_held("p", run.pid, "MainThread", allowed={command})})
        os.kill(run.pid, signal.SIGKILL)
        run.wait(DEADLINE)
        orphaned = Expectation("p", "orphaned", inheritor=command, recorded_pid=run.pid)
        orphan = _check({lock: orphaned})
        run.stdin.close()  # the command reads end of file and exits; the lock goes with it
        assert _read_line(run.stdout, deadline) == b"", "the command did not exit"
        _wait_gone(command, deadline)
        stale = _check({lock: Expectation("p", "free")}, stale={lock})
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(DEADLINE)
        run.stdout.close()
    assert not held, "while run holds:\n" + "\n".join(held)
    assert not orphan, "after run was killed:\n" + "\n".join(orphan)
    assert not stale, "after the command ended:\n" + "\n".join(stale)


def _command_of(pid: int) -> int:
    """The one child of ``pid`` (the command that ``run`` started)."""
    children = psutil.Process(pid).children()
    assert len(children) == 1, f"grex-locks run has children {children}"
    return children[0].pid


def _wait_gone(pid: int, deadline: float) -> None:
    """Wait until ``pid`` has exited (it is not our child: watch it through a pidfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"pid {pid} did not exit"
    finally:
        os.close(pidfd)


# -- a live holder cycling its lock: never STALE_RECORD -----------------------------------------


def cycle_pack_lock(pack: str, cycling: Any, stop: Any) -> None:
    """Take and release ``pack``'s lock until ``stop`` is set, each hold in a new named thread.

    The names differ in length, so records (and the spaces that blank them)
    differ from hold to hold as in real use; ``cycling`` is set after the first hold.
    """
    lock = PackLock(pack)

    def hold() -> None:
        with lock.acquire(timeout=DEADLINE):
            pass

    count = 0
    while not stop.is_set():
        count += 1
        thread = threading.Thread(target=hold, name="t" * (count % 37 + 1))
        thread.start()
        thread.join(DEADLINE)
        cycling.set()


@pytest.mark.timeout(60)
def test_a_live_holder_cycling_its_lock_is_never_called_dead(tmp_path: Path) -> None:
    """diagnose() and scan() of a lock whose live holder takes and releases it in a loop.

    A record read during one hold and a kernel table read after its release
    must not make a STALE_RECORD ("its holder died"): the holder is alive all
    along. A holder really killed still leaves a STALE_RECORD, seen at once.
    """
    pack, repo = tmp_path / "pack", tmp_path / "repo"
    pack.mkdir()
    lock = PackLock(pack).path
    context = multiprocessing.get_context("spawn")
    cycling, stop = context.Event(), context.Event()
    cycler = context.Process(target=cycle_pack_lock, args=(str(pack), cycling, stop))
    cycler.start()
    states: Counter[str] = Counter()
    dead: list[dict[str, Any]] = []
    strangers: list[dict[str, Any]] = []
    try:
        assert cycling.wait(DEADLINE), "the cycling holder never took its lock"
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            by_scan = sum(states.values()) % 2 == 1
            d = scan(pack)[0] if by_scan else diagnose(lock)
            states[d.state.name] += 1
            if d.state.name == "STALE_RECORD":
                dead.append(d.to_dict())
            elif d.state.name == "HELD" and [h.pid for h in d.holders] != [cycler.pid]:
                strangers.append(d.to_dict())
        alive = cycler.is_alive()
    finally:
        stop.set()
        cycler.join(DEADLINE)
        if cycler.exitcode is None:
            cycler.kill()
            cycler.join(DEADLINE)
    assert alive, "the cycling holder died during the test"
    assert cycler.exitcode == 0
    total = sum(states.values())
    called = f"{len(dead)} of {total} called the live holder dead ({dict(states)})"
    assert not dead, f"{called}: {dead[0]}"
    assert not strangers, f"HELD by someone else: {strangers[0]}"
    # A holder really killed while it holds leaves its record: STALE_RECORD, by either way.
    ready = context.Event()
    doomed = context.Process(target=take_and_die, args=(str(repo), ready))
    doomed.start()
    assert ready.wait(DEADLINE), "the doomed holder never took its lock"
    os.kill(doomed.pid or 0, signal.SIGKILL)
    doomed.join(DEADLINE)
    backend = BackendLock(repo).path
    for d in (diagnose(backend), *(d for d in scan(tmp_path) if d.path == backend)):
        assert d.state.name == "STALE_RECORD", d.to_dict()
        assert d.owner is not None
        assert d.owner["pid"] == doomed.pid


# -- a short randomized run --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_short_randomized_chaos_run_has_no_exactness_miss() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "stress.py"),
            "--quick",
            "--duration",
            "5",
            "--workers",
            "4",
            "--seed",
            "20240601",
            "--scan-interval",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    output = result.stdout + result.stderr
    exact = re.search(r"^exact\s+(\d+) / (\d+)", result.stdout, re.M)
    assert exact is not None, output[-8000:]
    misses = re.findall(r"^MISS .*", result.stdout, re.M)
    assert not misses, "\n".join(misses[:20])
    assert int(exact[2]) >= 30, output[-4000:]
