"""acquire_all: several locks of one tier, in one deadlock-free order, as one tier hold."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from support import (
    DEADLINE,
    Children,
    HeldInThread,
    InThread,
    PipedChild,
    acquire_all_repeatedly,
    hold_until_told,
    join_helper_threads,
    max_inside,
    must_wait,
    read_audit,
    try_in_child,
    try_lock,
    until,
    wait_until_blocked,
)

from grex_locks import (
    BackendLock,
    LockBusy,
    LockCancelled,
    LockTimeout,
    ManifestLock,
    PackLock,
    Scheduler,
    Tier,
    TierViolation,
    WorkspaceBusy,
    WorkspaceLock,
    acquire_all,
    set_tier_check,
)
from grex_locks._core import tiers
from grex_locks._core.tiers import TierCheckMode


def _packs(tmp_path: Path, count: int = 2) -> list[PackLock]:
    """``count`` pack locks, in the order acquire_all takes them (by lock file identity)."""
    locks = [PackLock(tmp_path / f"pack-{n}") for n in range(count)]

    def identity(lock: PackLock) -> tuple[int, int]:
        st = lock.path.stat()
        return (st.st_dev, st.st_ino)

    return sorted(locks, key=identity)


def _free_for_another_thread(lock: PackLock | WorkspaceLock) -> None:
    """Another thread can take ``lock`` without waiting (and gives it back)."""
    InThread(lambda: lock.try_acquire().release()).result()


# -- no deadlock -------------------------------------------------------------------------------


def test_opposite_orders_in_two_threads_never_deadlock(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    rounds = 1000
    mutex = threading.Lock()
    inside = 0
    go = threading.Event()

    def take(order: list[PackLock]) -> int:
        nonlocal inside
        must_wait(go, "the start signal")
        for _ in range(rounds):
            # A deadlock would end in LockTimeout here rather than hang.
            with acquire_all(order, timeout=DEADLINE) as group:
                with mutex:
                    inside += 1
                    assert inside == 1, "two groups of the same packs held at once"
                assert all(lock.held for lock in group.locks)
                with mutex:
                    inside -= 1
        return rounds

    forward = InThread(lambda: take([a, b]))
    # The other thread goes through lock objects of its own, given the other way round.
    backward = InThread(lambda: take([PackLock(b.path.parent), PackLock(a.path.parent)]))
    go.set()
    assert forward.result(5 * DEADLINE) == rounds
    assert backward.result(5 * DEADLINE) == rounds
    assert not a.held
    assert not b.held


def test_opposite_orders_in_two_processes_never_deadlock(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    log = tmp_path / "audit.log"
    rounds = 200
    with Children("spawn") as children:
        start = children.barrier(2)
        children.start(acquire_all_repeatedly, [a, b], log, rounds, start)
        children.start(acquire_all_repeatedly, [b, a], log, rounds, start)
        assert children.results(timeout=4 * DEADLINE) == [rounds, rounds]
    entries = read_audit(log)
    assert len(entries) == 4 * rounds
    assert max_inside(entries) == 1


def test_the_order_taken_does_not_depend_on_the_order_given(tmp_path: Path) -> None:
    locks = _packs(tmp_path, 4)
    for given in (locks, locks[::-1], [locks[2], locks[0], locks[3], locks[1]]):
        with acquire_all(given) as group:
            assert [lock.path for lock in group.locks] == [lock.path for lock in locks]


# -- failure releases what was taken -----------------------------------------------------------


def test_a_timeout_on_b_held_by_another_process_leaves_a_free(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    with PipedChild("spawn", hold_until_told, PackLock(b.path.parent)) as holder:
        holder.recv()  # ("held", pid): the other process holds B
        for given in ([a, b], [b, a]):
            with pytest.raises(LockTimeout) as caught:
                acquire_all(given, timeout=0.1)
            assert caught.value.path == b.path
            assert not a.held
            assert not b.held
            assert tiers.held_tiers() == ()
            # A is free: for another thread, and for another process.
            _free_for_another_thread(a)
        assert try_in_child(a, method="spawn") == "acquired"
        holder.send("release")
        holder.expect("released")
    with acquire_all([b, a], timeout=0):
        pass


def test_a_cancel_while_waiting_for_b_leaves_a_free(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    with PipedChild("spawn", hold_until_told, PackLock(b.path.parent)) as holder:
        holder.recv()  # ("held", pid): the other process holds B
        cancel = threading.Event()
        waiter = InThread(lambda: acquire_all([b, a], cancel=cancel))
        wait_until_blocked([b.path], os.getpid())
        assert a.held, "A is taken before B is waited for"
        cancel.set()
        with pytest.raises(LockCancelled):
            waiter.result()
        assert not a.held
        assert not b.held
        _free_for_another_thread(a)
        holder.send("release")
        holder.expect("released")


def test_a_busy_workspace_in_a_group_leaves_the_others_free(tmp_path: Path) -> None:
    workspaces = [WorkspaceLock(tmp_path / f"ws-{n}") for n in range(3)]
    busy = WorkspaceLock(workspaces[1].path.parent)
    with HeldInThread(busy):  # the other sync
        with pytest.raises(WorkspaceBusy):
            acquire_all(workspaces, timeout=60)
        assert not any(lock.held for lock in workspaces)
        for lock in (workspaces[0], workspaces[2]):
            _free_for_another_thread(lock)


@pytest.mark.parametrize("mode", ["raise", "off"])
def test_a_lock_this_thread_already_holds_is_refused_and_nothing_is_kept(
    tmp_path: Path, mode: TierCheckMode
) -> None:
    """Re-entry is checked first, in every tier check mode (docs/locks.md, tiers): LockBusy."""
    a, b, c = _packs(tmp_path, 3)
    set_tier_check(mode)
    try:
        with b, pytest.raises(LockBusy):
            acquire_all([a, PackLock(b.path.parent), c])
    finally:
        set_tier_check("raise")
    assert not a.held
    assert not c.held
    with acquire_all([a, b, c]):
        pass


# -- the group's shape -------------------------------------------------------------------------


def test_the_same_lock_given_twice_is_taken_once(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    again = PackLock(a.path.parent / ".." / a.path.parent.name)
    with acquire_all([a, b, a, again, b]) as group:
        assert len(group.locks) == 2
        assert a.held
        assert b.held
        assert tiers.held_tiers() == (Tier.PER_PACK,)
    assert not a.held
    assert not b.held
    assert not again.held


def test_an_empty_list_is_a_no_op(tmp_path: Path) -> None:
    with acquire_all([]) as group:
        assert group.locks == []
        assert tiers.held_tiers() == ()
        # Any tier can still be taken.
        with WorkspaceLock(tmp_path):
            pass
    with acquire_all(iter(())):
        pass


def test_locks_of_different_tiers_are_a_value_error(tmp_path: Path) -> None:
    pack = PackLock(tmp_path / "pack")
    backend = BackendLock(tmp_path / "repos" / "dest")
    manifest = ManifestLock(tmp_path / ".grex.lock")
    for mixed in ([pack, backend], [manifest, pack], [pack, pack, manifest]):
        with pytest.raises(ValueError, match="one tier"):
            acquire_all(mixed)
        assert not pack.held
        assert not backend.held
        assert not manifest.held
        assert tiers.held_tiers() == ()


def test_a_group_is_one_tier_hold_with_inner_tiers_allowed_inside(tmp_path: Path) -> None:
    a, b, c = _packs(tmp_path, 3)
    scheduler = Scheduler(2)
    with scheduler.acquire(), acquire_all([a, b]):
        assert tiers.held_tiers() == (Tier.SEMAPHORE, Tier.PER_PACK)
        with pytest.raises(TierViolation):
            c.acquire(timeout=0)
        with pytest.raises(TierViolation):
            acquire_all([c])
        with BackendLock(tmp_path / "repos" / "a"):
            assert tiers.held_tiers() == (Tier.SEMAPHORE, Tier.PER_PACK, Tier.BACKEND)
    assert tiers.held_tiers() == ()


def test_an_inner_lock_inside_a_group(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    with acquire_all([a, b]):
        assert tiers.held_tiers() == (Tier.PER_PACK,)
        with BackendLock(tmp_path / "repos" / "dest"):
            assert tiers.held_tiers() == (Tier.PER_PACK, Tier.BACKEND)
            with ManifestLock(tmp_path / ".grex.lock").write():
                assert tiers.held_tiers() == (Tier.PER_PACK, Tier.BACKEND, Tier.MANIFEST)
        with acquire_all([BackendLock(tmp_path / "r" / "x"), BackendLock(tmp_path / "r" / "y")]):
            assert tiers.held_tiers() == (Tier.PER_PACK, Tier.BACKEND)
    assert tiers.held_tiers() == ()


# -- releasing a group -------------------------------------------------------------------------


def _release_left_over(*locks: PackLock) -> None:
    """Clean up after a group that could not be released (so one bug fails one test)."""
    for lock in locks:
        if lock.held:
            lock.release()
    if tiers.held_tiers():
        tiers.reset_after_fork()


def test_releasing_a_group_from_another_thread_is_a_runtime_error(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    group = acquire_all([a, b])
    try:
        with pytest.raises(RuntimeError):
            InThread(group.release).result()
        # Still held, and still ours to release.
        assert a.held
        assert b.held
        group.release()
        assert not a.held
        assert not b.held
        assert tiers.held_tiers() == ()
    finally:
        _release_left_over(a, b)


def test_releasing_a_group_twice_is_a_runtime_error(tmp_path: Path) -> None:
    a, b = _packs(tmp_path)
    group = acquire_all([a, b])
    group.release()
    try:
        with pytest.raises(RuntimeError):
            group.release()
    finally:
        _release_left_over(a, b)


# -- what acquire_all accepts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "intruder",
    ["not a lock", 42, None, Path("/tmp/x"), Scheduler(1)],
    ids=["str", "int", "None", "Path", "Scheduler"],
)
def test_acquire_all_refuses_what_is_not_a_lock_before_taking_anything(
    tmp_path: Path, intruder: Any
) -> None:
    first = PackLock(tmp_path / "a")
    last = PackLock(tmp_path / "b")
    with pytest.raises(TypeError) as caught:
        acquire_all([first, intruder, last])
    text = str(caught.value)
    assert repr(intruder)[:40] in text
    assert "PackLock" in text
    assert "ManifestLock" in text
    assert "item 1" in text
    for lock in (first, last):
        assert not lock.held
        _free_for_another_thread(lock)


@pytest.mark.parametrize("given", ["single lock", "str"])
def test_acquire_all_needs_a_collection_of_locks(tmp_path: Path, given: str) -> None:
    lock = PackLock(tmp_path / "a")
    locks: Any = lock if given == "single lock" else str(tmp_path / "a")
    with pytest.raises(TypeError) as caught:
        acquire_all(locks)
    assert "acquire_all" in str(caught.value)
    assert "list" in str(caught.value)
    assert not lock.held


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock(1)")
def test_a_group_timeout_reports_the_whole_wait(tmp_path: Path) -> None:
    # The first lock (in the group's order) is let go once the group waits for
    # it, the second never: the group waits for both, and its error's `waited`
    # is the group's wait, at least the timeout, not just the wait for the second.
    locks = sorted(
        (PackLock(tmp_path / name) for name in ("one", "two")),
        key=lambda lock: (os.stat(lock.path).st_dev, os.stat(lock.path).st_ino),
    )
    first, second = locks
    # Each in a session of its own: flock's child holds the lock too.
    forever = subprocess.Popen(["flock", str(second.path), "sleep", "60"], start_new_session=True)
    until_told = subprocess.Popen(
        ["flock", str(first.path), "-c", "read line"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )

    def let_go_once_waited_for() -> None:
        wait_until_blocked(first.path, os.getpid())
        assert until_told.stdin is not None
        until_told.stdin.close()

    letting_go = threading.Thread(target=let_go_once_waited_for)
    try:
        until(lambda: try_lock(first) == try_lock(second) == "LockBusy", "both held")
        letting_go.start()
        with pytest.raises(LockTimeout) as caught:
            acquire_all([second, first], timeout=1.0)
        letting_go.join(DEADLINE)
        assert caught.value.waited >= 1.0
        assert caught.value.path == second.path
    finally:
        for child in (forever, until_told):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(DEADLINE)
        join_helper_threads()  # the group's wait for `second`, left behind, ends
