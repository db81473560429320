"""PackLock under real contention: threads, processes, signals, hostile files, tiers."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing.connection
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from loguru import logger
from support import (
    DEADLINE,
    HOLD_BACKSTOP,
    START_METHODS,
    WAIT_HELPER_THREADS,
    CancelWhenBlocked,
    HeldInThread,
    PipedChild,
    acquire_in_child,
    hold_until_told,
    holder_record,
    join_helper_threads,
    open_fd_count,
    owner_record,
    try_in_child,
    wait_until_blocked,
)

import grex_locks
from grex_locks import (
    BackendLock,
    LockBusy,
    LockCancelled,
    LockIOError,
    LockTimeout,
    ManifestLock,
    PackLock,
    Tier,
    TierViolation,
    WorkspaceLock,
)
from grex_locks._core import fair_queue, tiers
from grex_locks._core import lock_file as lockfile

#: What "promptly" means in an assertion: a bound that only a hang misses.
#: How fast it really is belongs to scripts/bench.py, never to a test.
PROMPTLY = 5.0


def _run_threads(count: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not any(thread.is_alive() for thread in threads), "threads still running"


# -- threads ------------------------------------------------------------------


@pytest.mark.parametrize("shared_object", [True, False], ids=["one object", "object per thread"])
def test_100_threads_on_one_pack_never_overlap(pack: Path, shared_object: bool) -> None:
    shared = PackLock(pack)
    inside = 0
    overlaps: list[int] = []
    entries = 0
    errors: list[BaseException] = []
    start = threading.Barrier(100, timeout=DEADLINE)

    def worker(_: int) -> None:
        nonlocal inside, entries
        lock = shared if shared_object else PackLock(pack)
        try:
            start.wait()
            for _ in range(10):
                with lock:
                    inside += 1
                    if inside != 1:
                        overlaps.append(inside)
                    os.sched_yield()
                    entries += 1
                    inside -= 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads(100, worker)
    assert errors == []
    assert overlaps == []
    assert entries == 1000


def test_100_threads_on_100_packs_run_at_once(tmp_path: Path) -> None:
    # Every thread must be inside its critical section at the same moment for
    # the barrier to open: any serialisation between packs breaks it.
    all_inside = threading.Barrier(100, timeout=DEADLINE)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with PackLock(tmp_path / f"pack-{i}"):
                all_inside.wait()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads(100, worker)
    assert errors == []


def test_two_walks_in_opposite_orders_do_not_deadlock(tmp_path: Path) -> None:
    # Without acquire_all, a walk takes one pack at a time: no hold-and-wait,
    # so no cycle, whatever order the walks go in.
    packs = [tmp_path / f"pack-{i}" for i in range(8)]
    orders = [packs[:6], list(reversed(packs[2:]))]
    visits: list[list[Path]] = [[], []]
    errors: list[BaseException] = []

    def walk(i: int) -> None:
        try:
            for _ in range(25):
                for path in orders[i]:
                    with PackLock(path):
                        assert tiers.held_tiers() == (Tier.PER_PACK,)
                        visits[i].append(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads(2, walk)
    assert errors == []
    assert [len(v) for v in visits] == [150, 150]


def test_holding_two_packs_in_one_thread_is_a_tier_violation(tmp_path: Path) -> None:
    with PackLock(tmp_path / "a"), pytest.raises(TierViolation) as caught:
        PackLock(tmp_path / "b").acquire()
    assert caught.value.held == Tier.PER_PACK
    assert caught.value.requested == Tier.PER_PACK


# -- processes ----------------------------------------------------------------


def _count_under_lock(
    conn: multiprocessing.connection.Connection, lock: PackLock, counter: Path, cycles: int
) -> None:
    me = os.getpid()
    started = psutil.Process(me).create_time()
    conn.send("ready")
    assert conn.poll(DEADLINE)
    conn.recv()
    wrong: list[dict[str, Any]] = []
    for _ in range(cycles):
        with lock:
            record = holder_record(lock.path)
            if record["pid"] != me or record["create_time"] != started:
                wrong.append(record)
            counter.write_text(str(int(counter.read_text()) + 1))
    conn.send(("done", len(wrong), wrong[:3]))


@pytest.mark.parametrize("method", START_METHODS)
def test_4_processes_x_200_cycles_count_exactly(pack: Path, method: str) -> None:
    counter = pack / "counter"
    counter.write_text("0")
    lock = PackLock(pack)
    children = [PipedChild(method, _count_under_lock, lock, counter, 200) for _ in range(4)]
    try:
        for child in children:
            child.expect("ready")
        for child in children:
            child.send("go")
        for child in children:
            done, wrong, examples = child.recv(timeout=30)
            assert done == "done"
            assert wrong == 0, f"records naming someone else inside the lock: {examples}"
        for child in children:
            assert child.join() == 0
    finally:
        for child in children:
            child.__exit__()
    assert int(counter.read_text()) == 800


def test_sigkilled_holder_frees_the_lock_and_its_record_is_replaced(pack: Path) -> None:
    lock = PackLock(pack)
    with PipedChild("fork", hold_until_told, lock) as holder:
        _, holder_pid = holder.recv()
        with pytest.raises(LockBusy):
            lock.try_acquire()
        holder.kill()
    leftover = holder_record(lock.path)
    assert leftover["pid"] == holder_pid
    with lock.try_acquire():
        record = holder_record(lock.path)
        assert record["pid"] == os.getpid()
        assert record["create_time"] == psutil.Process().create_time()
    assert owner_record(lock.path) is None
    assert try_in_child(lock) == "acquired"


def test_blocked_waiter_gets_the_lock_when_its_holder_is_sigkilled(pack: Path) -> None:
    lock = PackLock(pack)
    with PipedChild("fork", hold_until_told, lock) as holder:
        holder.recv()

        def kill_when_waited_for() -> None:
            try:
                wait_until_blocked(lock.path, os.getpid())
            finally:
                holder.process.kill()

        killer = threading.Thread(target=kill_when_waited_for)
        killer.start()
        with lock.acquire(timeout=HOLD_BACKSTOP * 2):
            assert holder_record(lock.path)["pid"] == os.getpid()
        killer.join(DEADLINE)
        assert holder.join() == -signal.SIGKILL
    join_helper_threads()


# -- giving up: cancel and timeout --------------------------------------------


def _assert_nothing_held_here(lock: PackLock) -> None:
    assert not lock.held
    assert fair_queue.queues_in_use() == 0
    assert tiers.held_tiers() == ()


def _assert_free_for_everyone(lock: PackLock) -> None:
    """Once the abandoned kernel waits have ended, the lock is free at once to all."""
    join_helper_threads()
    with lock.try_acquire():
        assert lock.held
    assert try_in_child(lock) == "acquired"
    assert acquire_in_child(lock, timeout=0) == "acquired"


@pytest.mark.parametrize("timeout", [None, 600.0], ids=["cancel only", "cancel and timeout"])
def test_cancel_while_another_process_holds(pack: Path, timeout: float | None) -> None:
    lock = PackLock(pack)
    lock.try_acquire().release()  # open everything before counting descriptors
    baseline = open_fd_count()
    with PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        holder.recv()
        cancel = threading.Event()
        canceller = CancelWhenBlocked(lock.path, cancel)
        started = time.monotonic()
        with pytest.raises(LockCancelled) as caught:
            lock.acquire(timeout=timeout, cancel=cancel)
        assert time.monotonic() - started < PROMPTLY
        canceller.join()
        assert caught.value.path == lock.path
        _assert_nothing_held_here(lock)
        holder.send("release")
        holder.expect("released")
        assert holder.join() == 0
    _assert_free_for_everyone(lock)
    assert open_fd_count() == baseline


def test_timeout_while_another_process_holds(pack: Path) -> None:
    lock = PackLock(pack)
    lock.try_acquire().release()
    baseline = open_fd_count()
    with PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        _, holder_pid = holder.recv()
        started = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            lock.acquire(timeout=0.2)
        assert time.monotonic() - started < PROMPTLY
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.path == lock.path
        assert 0 < caught.value.waited < PROMPTLY
        assert str(holder_pid) in str(caught.value)
        _assert_nothing_held_here(lock)
        holder.send("release")
        holder.expect("released")
        assert holder.join() == 0
    _assert_free_for_everyone(lock)
    assert open_fd_count() == baseline


def test_cancel_through_a_manager_event(pack: Path) -> None:
    lock = PackLock(pack)
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        holder.recv()
        cancel = manager.Event()
        canceller = CancelWhenBlocked(lock.path, cancel)
        started = time.monotonic()
        with pytest.raises(LockCancelled):
            lock.acquire(cancel=cancel)
        assert time.monotonic() - started < PROMPTLY
        canceller.join()
        _assert_nothing_held_here(lock)
        holder.send("release")
        holder.expect("released")
    _assert_free_for_everyone(lock)


@pytest.mark.parametrize("contended", [False, True], ids=["free", "held elsewhere"])
@pytest.mark.parametrize("timeout", [None, 0, 600.0])
def test_cancel_already_set_at_the_call(pack: Path, contended: bool, timeout: float | None) -> None:
    lock = PackLock(pack)
    cancel = threading.Event()
    cancel.set()
    with PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        holder.recv()
        if not contended:
            holder.send("release")
            holder.expect("released")
        with pytest.raises(LockCancelled):
            lock.acquire(timeout=timeout, cancel=cancel)
        _assert_nothing_held_here(lock)
        if contended:
            holder.send("release")
            holder.expect("released")
    _assert_free_for_everyone(lock)


def test_timeout_zero_is_one_try(pack: Path) -> None:
    lock = PackLock(pack)
    with lock.acquire(timeout=0):
        assert lock.held
    with HeldInThread(PackLock(pack)):
        with pytest.raises(LockTimeout):
            lock.acquire(timeout=0)
        _assert_nothing_held_here_but_the_thread(lock)
    with PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        holder.recv()
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            lock.acquire(timeout=0)
        assert time.monotonic() - started < PROMPTLY
        _assert_nothing_held_here(lock)
        holder.send("release")
        holder.expect("released")
    _assert_free_for_everyone(lock)


def _assert_nothing_held_here_but_the_thread(lock: PackLock) -> None:
    assert not lock.held
    assert tiers.held_tiers() == ()


# -- SIGINT -------------------------------------------------------------------


def _interrupted_waiter(
    conn: multiprocessing.connection.Connection, lock: PackLock, timeout: float | None
) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    conn.send("ready")
    try:
        lock.acquire(timeout=timeout)
    except KeyboardInterrupt as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        inside = any("grex_locks" in frame.filename for frame in frames)
        conn.send(
            ("interrupted", inside, lock.held, fair_queue.queues_in_use(), tiers.held_tiers())
        )
    else:
        lock.release()
        conn.send(("acquired",))
        return
    # Stay alive (keeping whatever this process still has open) until the
    # test is done checking that nothing here holds the lock.
    assert conn.poll(HOLD_BACKSTOP)
    assert conn.recv() == "settle"
    join_helper_threads()
    conn.send(("settled", len(lockfile.owned_descriptors())))
    assert conn.poll(HOLD_BACKSTOP)
    conn.recv()


@pytest.mark.parametrize("timeout", [None, 600.0], ids=["no timeout", "with timeout"])
def test_sigint_in_blocked_acquire_leaves_nothing_held(pack: Path, timeout: float | None) -> None:
    lock = PackLock(pack)
    with PipedChild("fork", hold_until_told, lock) as holder:
        holder.recv()
        with PipedChild("fork", _interrupted_waiter, lock, timeout) as waiter:
            waiter.expect("ready")
            wait_until_blocked(lock.path, waiter.pid)
            os.kill(waiter.pid, signal.SIGINT)
            # Raised inside acquire; nothing held, registered or tiered there.
            assert waiter.recv() == ("interrupted", True, False, 0, ())
            holder.send("release")
            holder.expect("released")
            assert holder.join() == 0
            waiter.send("settle")
            assert waiter.recv()[0] == "settled"
            # The interrupted process is still alive: a third one gets the lock at once.
            assert waiter.process.is_alive()
            assert try_in_child(lock) == "acquired"
            waiter.send("exit")
            assert waiter.join() == 0


@dataclass(frozen=True)
class StormPlan:
    """How an interrupt storm runs: see :func:`_interrupt_storm`."""

    timeout: float | None
    latest: float
    keep_going: bool
    iterations: int = 400


def _interrupt_storm(
    conn: multiprocessing.connection.Connection, lock: PackLock, plan: StormPlan
) -> None:
    """Interrupt ``plan.iterations`` acquires at random moments; report what leaked.

    A one-shot real-time timer delivers a real signal whose Python handler
    raises ``KeyboardInterrupt`` (as Ctrl-C does) at a random moment up to
    ``plan.latest`` seconds into the acquire (or the whole with-block).
    Without ``keep_going`` the first in-process leak ends the storm; with it
    the leaked bookkeeping is reset (as a fork would) so that the storm can
    go on to see whether the OS lock itself is ever kept.
    """
    signal.signal(signal.SIGALRM, signal.default_int_handler)
    rng = random.Random(os.getpid())
    interrupted = 0
    leaks: list[tuple[int, list[str], str]] = []
    for i in range(plan.iterations):
        trace = ""
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, plan.latest))
            if plan.timeout is None:
                with lock:
                    pass
            else:
                with contextlib.suppress(LockTimeout), lock.acquire(timeout=plan.timeout):
                    pass
            signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            interrupted += 1
            trace = traceback.format_exc()
        except RuntimeError as exc:
            # CPython's own Condition (inside Thread.start) is not interrupt-safe
            # and turns some KeyboardInterrupts into this; not the library's doing.
            if not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            interrupted += 1
            trace = traceback.format_exc()
        problems = [
            name
            for name, leaked in (
                ("held", lock.held),
                ("gate registry entry", fair_queue.queues_in_use() != 0),
                ("tier", tiers.held_tiers() != ()),
            )
            if leaked
        ]
        if problems:
            leaks.append((i, problems, trace))
            if not plan.keep_going:
                break
            tiers.reset_after_fork()
    conn.send((interrupted, leaks[:1], len(leaks)))
    assert conn.poll(HOLD_BACKSTOP)
    conn.recv()  # "settle": the contending holder is gone
    stuck = 0
    # Helper threads are counted only when the storm went on past leaks: that
    # storm is about what the kernel waits leave behind.
    deadline = time.monotonic() + (PROMPTLY if plan.keep_going else 0.0)
    for thread in threading.enumerate():
        # is_alive() is False for a thread whose start() was itself interrupted.
        if thread.name in WAIT_HELPER_THREADS and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
            stuck += thread.is_alive()
    conn.send(stuck)
    assert conn.poll(HOLD_BACKSTOP)
    conn.recv()


def _storm(
    pack: Path,
    *,
    contended: bool,
    timeout: float | None,
    latest: float,
    keep_going: bool,
    iterations: int = 400,
) -> tuple[list[tuple[int, list[str], str]], int, int, str]:
    """Storm ``pack``; return (first leak, leak count, stuck helper threads, a third's try)."""
    lock = PackLock(pack)
    with (
        PipedChild("fork", hold_until_told, PackLock(pack)) as holder,
        PipedChild(
            "fork", _interrupt_storm, lock, StormPlan(timeout, latest, keep_going, iterations)
        ) as storm,
    ):
        holder.recv()
        if not contended:
            holder.send("release")
            holder.expect("released")
        _, first_leak, leaks = storm.recv(timeout=40)
        if contended:
            holder.send("release")
            holder.expect("released")
        storm.send("settle")
        stuck = storm.recv()
        # The interrupted process is still alive: the lock must be free for a third.
        third = try_in_child(lock)
        storm.send("exit")
        return first_leak, leaks, stuck, third


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("contended", "timeout", "latest"),
    [(False, None, 80e-6), (True, 0.002, 150e-6)],
    ids=["uncontended", "held by another process"],
)
def test_keyboard_interrupt_at_any_moment_of_acquire_leaves_no_bookkeeping(
    pack: Path, contended: bool, timeout: float | None, latest: float
) -> None:
    first_leak, leaks, _, third = _storm(
        pack, contended=contended, timeout=timeout, latest=latest, keep_going=False
    )
    assert leaks == 0, "after interrupt #{} this process kept: {}\n{}".format(*first_leak[0])
    if not contended:  # (kernel waits left behind are the next test's subject)
        assert third == "acquired"


@pytest.mark.timeout(90)
def test_keyboard_interrupt_at_any_moment_of_acquire_never_keeps_the_lock(pack: Path) -> None:
    # The windows are a few bytecodes wide: ~1% of interrupts land in one,
    # so 1,500 of them miss none with any real probability.
    _, _, stuck, third = _storm(
        pack, contended=True, timeout=0.002, latest=300e-6, keep_going=True, iterations=1500
    )
    assert third == "acquired", "the interrupted process still holds the lock"
    assert stuck == 0, f"{stuck} kernel-wait helper threads never ended"


# -- hostile files at the lock path -------------------------------------------


def test_symlink_at_the_lock_path_is_refused_and_its_target_untouched(
    pack: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"precious bytes")
    (pack / grex_locks.PACK_LOCK_FILE_NAME).symlink_to(target)
    with pytest.raises(LockIOError) as caught:
        PackLock(pack)
    assert caught.value.path == pack / grex_locks.PACK_LOCK_FILE_NAME
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ELOOP
    assert target.read_bytes() == b"precious bytes"
    assert (pack / grex_locks.PACK_LOCK_FILE_NAME).is_symlink()


def test_dangling_symlink_at_the_lock_path_creates_nothing(pack: Path, tmp_path: Path) -> None:
    target = tmp_path / "not-there"
    (pack / grex_locks.PACK_LOCK_FILE_NAME).symlink_to(target)
    with pytest.raises(LockIOError) as caught:
        PackLock(pack)
    assert caught.value.path == pack / grex_locks.PACK_LOCK_FILE_NAME
    assert not target.exists()


def test_directory_at_the_lock_path_is_refused(pack: Path) -> None:
    (pack / grex_locks.PACK_LOCK_FILE_NAME).mkdir()
    with pytest.raises(LockIOError) as caught:
        PackLock(pack)
    assert caught.value.path == pack / grex_locks.PACK_LOCK_FILE_NAME
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.timeout(10)
def test_fifo_at_the_lock_path_is_refused_without_hanging(pack: Path) -> None:
    os.mkfifo(pack / grex_locks.PACK_LOCK_FILE_NAME)
    baseline = open_fd_count()
    with pytest.raises(LockIOError) as caught:
        PackLock(pack)
    assert caught.value.path == pack / grex_locks.PACK_LOCK_FILE_NAME
    assert open_fd_count() == baseline


def test_symlink_at_the_record_path_is_replaced_not_written_through(
    pack: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"precious bytes")
    record_file = pack / (grex_locks.PACK_LOCK_FILE_NAME + grex_locks.OWNER_SUFFIX)
    record_file.symlink_to(target)
    lock = PackLock(pack)
    with lock:
        assert not record_file.is_symlink()
        assert holder_record(lock.path)["pid"] == os.getpid()
    assert target.read_bytes() == b"precious bytes"


_READ_ONLY_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from grex_locks import LockIOError, PackLock
    from grex_locks._core import fair_queue
    from grex_locks._core import tiers

    ro = Path(sys.argv[1])
    out = {}
    try:
        PackLock(ro / "fresh")
    except LockIOError as exc:
        cause = exc.__cause__
        out["fresh"] = [str(exc.path), getattr(cause, "errno", None)]
    lock = PackLock(ro / "old")
    with lock:
        # The record cannot be written here; the lock is held all the same.
        out["old"] = [lock.held, lock.path.with_name(".grex-lock.owner").exists()]
    out["after"] = [lock.held, fair_queue.queues_in_use(), list(tiers.held_tiers())]
    print(json.dumps(out))
    """
)


def _read_only_wrapper(how: str, directory: Path) -> list[str]:
    if how == "no CAP_DAC_OVERRIDE":
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(directory)]


@pytest.fixture(params=["no CAP_DAC_OVERRIDE", "read-only mount"])
def read_only_dir(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, list[str]]]:
    """A directory this test can read but not write, and the argv prefix that makes it so."""
    how: str = request.param
    directory = tmp_path / "ro"
    (directory / "fresh").mkdir(parents=True)
    PackLock(directory / "old")  # a lock file that exists already; never held
    if how == "no CAP_DAC_OVERRIDE":
        for sub in (directory, directory / "fresh", directory / "old"):
            sub.chmod(0o555)
    wrapper = _read_only_wrapper(how, directory)
    if shutil.which(wrapper[0]) is None:
        pytest.skip(f"{wrapper[0]} is not installed")
    probe = subprocess.run(
        [
            *wrapper,
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'x')",
            str(directory / "fresh" / "probe"),
        ],
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )
    if probe.returncode == 0 or b"[Errno" not in probe.stderr:
        pytest.skip(f"cannot make a read-only directory by {how} here: {probe.stderr[-300:]!r}")
    yield directory, wrapper
    for sub in (directory, directory / "fresh", directory / "old"):
        sub.chmod(0o755)


def test_read_only_directory_refuses_new_lock_files_but_existing_ones_lock(
    read_only_dir: tuple[Path, list[str]],
) -> None:
    directory, wrapper = read_only_dir
    run = subprocess.run(
        [*wrapper, sys.executable, "-c", _READ_ONLY_PROBE, str(directory)],
        capture_output=True,
        timeout=DEADLINE * 2,
        check=False,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    fresh_lock = directory / "fresh" / grex_locks.PACK_LOCK_FILE_NAME
    assert out["fresh"][0] == str(fresh_lock)
    assert out["fresh"][1] in (errno.EACCES, errno.EPERM, errno.EROFS)
    assert not fresh_lock.exists()
    # The lock file existed, so it opened and locked; the owner record could
    # not be written, which is information lost, never a lock refused.
    assert out["old"] == [True, False]
    assert out["after"] == [False, 0, []]
    assert try_in_child(PackLock(directory / "old")) == "acquired"


# -- tiers --------------------------------------------------------------------


@pytest.fixture
def grex_log() -> Iterator[list[Any]]:
    """Records grex_locks logs through loguru while the test runs."""
    records: list[Any] = []
    logger.enable("grex_locks")
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink)
    logger.disable("grex_locks")


@pytest.mark.parametrize("store", ["mapped", "pwrite"])
def test_overwriting_a_dead_holders_record_is_logged(
    tmp_path: Path, grex_log: list[Any], store: str
) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    if store == "pwrite":
        pack.chmod(0o775)  # a group-shared directory: records others may write are never mapped
    lock = PackLock(pack)
    for _ in range(2):
        with lock:  # the record file exists, cleared, and is this object's
            pass
    assert not [r for r in grex_log if "stale" in r["message"]], "a cleared record is no record"
    with PipedChild("spawn", hold_until_told, PackLock(pack)) as dead:
        dead.expect(("held", dead.pid))
        dead.kill()  # holding: its record stays
    with lock:
        assert holder_record(lock.path)["pid"] == os.getpid()
    stale = [r for r in grex_log if "stale owner record" in r["message"]]
    assert len(stale) == 1, [r["message"] for r in grex_log]
    assert f"pid {dead.pid}" in stale[0]["message"]
    assert stale[0]["level"].name == "INFO"


@pytest.mark.timeout(HOLD_BACKSTOP + 20)
def test_tier_violation_raises_before_any_waiting(pack: Path, tmp_path: Path) -> None:
    contested = PackLock(pack)
    with PipedChild("fork", hold_until_told, PackLock(pack)) as holder:
        holder.recv()
        with BackendLock(tmp_path / "dest"):
            # A wait here would last until the holder's backstop and then succeed.
            for attempt in (contested.acquire, contested.try_acquire):
                with pytest.raises(TierViolation) as caught:
                    attempt()
                assert caught.value.held == Tier.BACKEND
                assert caught.value.requested == Tier.PER_PACK
                assert caught.value.path == contested.path
                assert tiers.held_tiers() == (Tier.BACKEND,)
            assert fair_queue.queues_in_use() == 1
        holder.send("release")
        holder.expect("released")


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        (lambda d: ManifestLock(d / "m.lock"), lambda d: BackendLock(d / "dest")),
        (lambda d: BackendLock(d / "dest"), lambda d: PackLock(d / "p")),
        (lambda d: PackLock(d / "p"), lambda d: WorkspaceLock(d / "w")),
        (lambda d: ManifestLock(d / "m.lock"), lambda d: WorkspaceLock(d / "w")),
    ],
    ids=["manifest>backend", "backend>pack", "pack>workspace", "manifest>workspace"],
)
def test_every_downward_step_is_a_violation(tmp_path: Path, outer: Any, inner: Any) -> None:
    with outer(tmp_path), pytest.raises(TierViolation):
        inner(tmp_path).acquire()


def test_increasing_tiers_are_allowed(tmp_path: Path) -> None:
    with (
        WorkspaceLock(tmp_path / "w"),
        PackLock(tmp_path / "p"),
        BackendLock(tmp_path / "dest"),
        ManifestLock(tmp_path / "m.lock"),
    ):
        assert tiers.held_tiers() == (
            Tier.WORKSPACE_SYNC,
            Tier.PER_PACK,
            Tier.BACKEND,
            Tier.MANIFEST,
        )


def test_warn_mode_warns_at_the_callers_line_logs_and_goes_on(
    pack: Path, tmp_path: Path, grex_log: list[Any]
) -> None:
    grex_locks.set_tier_check("warn")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with BackendLock(tmp_path / "dest"), PackLock(pack) as inner:
            assert inner.held
            assert tiers.held_tiers() == (Tier.BACKEND, Tier.PER_PACK)
    assert [w.category for w in warned] == [grex_locks.TierOrderWarning]
    assert "PER_PACK" in str(warned[0].message)
    assert [w.filename for w in warned] == [__file__], "the warning names the caller's line"
    errors = [r for r in grex_log if r["level"].name == "ERROR"]
    assert len(errors) == 1
    assert "PER_PACK" in errors[0]["message"]
    assert str(pack) in errors[0]["message"]


def test_warn_mode_is_visible_by_default_once_per_call_site(tmp_path: Path) -> None:
    script = (
        "import pathlib, sys, grex_locks\n"
        "grex_locks.set_tier_check('warn')\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "for _ in range(3):\n"
        "    with grex_locks.ManifestLock(root / 'm'):\n"
        "        with grex_locks.PackLock(root / 'p'):\n"
        "            pass\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    assert run.stderr.count("TierOrderWarning") == 1, run.stderr
    assert "<string>:6" in run.stderr


def test_off_mode_allows_silently(pack: Path, tmp_path: Path, grex_log: list[Any]) -> None:
    grex_locks.set_tier_check("off")
    with (
        BackendLock(tmp_path / "dest"),
        PackLock(pack) as inner,
        PackLock(tmp_path / "b"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        assert inner.held
    assert [r for r in grex_log if r["level"].no >= 30] == []


def test_set_tier_check_refuses_unknown_modes() -> None:
    before = tiers.tier_check_mode()
    with pytest.raises(ValueError, match="bogus"):
        grex_locks.set_tier_check("bogus")  # type: ignore[arg-type]
    assert tiers.tier_check_mode() == before


_ENV_PROBE = textwrap.dedent(
    """
    import sys
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, format="{level}|{message}")
    logger.enable("grex_locks")
    import grex_locks
    from grex_locks._core import tiers
    print(tiers.tier_check_mode())
    if len(sys.argv) > 1:
        grex_locks.set_tier_check(sys.argv[1])
        print(tiers.tier_check_mode())
    """
)


def _env_probe(value: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("GREX_LOCKS_TIER_CHECK", None)
    if value is not None:
        env["GREX_LOCKS_TIER_CHECK"] = value
    return subprocess.run(
        [sys.executable, "-c", _ENV_PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
        check=True,
    )


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "raise"), ("raise", "raise"), ("warn", "warn"), ("off", "off"), ("", "raise")],
)
def test_tier_check_env_var_is_read_at_import(value: str | None, mode: str) -> None:
    run = _env_probe(value)
    assert run.stdout.split() == [mode]
    assert "WARNING" not in run.stderr


def test_unknown_tier_check_env_value_warns_and_keeps_raise() -> None:
    run = _env_probe("bogus")
    assert run.stdout.split() == ["raise"]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING|")]
    assert len(warnings) == 1
    assert "GREX_LOCKS_TIER_CHECK" in warnings[0]
    assert "bogus" in warnings[0]


def test_set_tier_check_overrides_the_env_var() -> None:
    run = _env_probe("off", "raise")
    assert run.stdout.split() == ["off", "raise"]


# -- scale --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_20_000_packs_leave_no_registry_entries_or_descriptors() -> None:
    # Checked every 1,000 packs: a leak of one descriptor per pack shows at
    # the first check. (100,000 packs took 43 s of CI's six minutes; 20,000 is
    # also past this machine's 20,000-descriptor limit, were each one kept.)
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if os.access(shm, os.W_OK) else None))
    before = set(lockfile.owned_descriptors())
    baseline = open_fd_count()
    try:
        for i in range(20_000):
            with PackLock(root / str(i)):
                pass
            if i % 1000 == 999:
                grown = open_fd_count() - baseline
                assert grown <= 0, f"{grown} descriptors more after {i + 1} packs"
        assert fair_queue.queues_in_use() == 0
        assert open_fd_count() == baseline
    finally:
        # Close what leaked, so one failure does not starve every later test.
        for fd in set(lockfile.owned_descriptors()) - before:
            lockfile.close(fd)
        shutil.rmtree(root, ignore_errors=True)
