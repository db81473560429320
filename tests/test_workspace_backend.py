"""WorkspaceLock (two syncs are an error, not a queue) and BackendLock (beside ``<dest>``)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    DEADLINE,
    Children,
    HeldInThread,
    InThread,
    PipedChild,
    attempt_sync,
    fetch_repeatedly,
    hold_until_told,
    read_audit,
    try_lock,
)

from grex_locks import (
    BACKEND_LOCK_SUFFIX,
    OWNER_SUFFIX,
    SYNC_LOCK_FILE_NAME,
    BackendLock,
    LockBusy,
    LockTimeout,
    Tier,
    WorkspaceBusy,
    WorkspaceLock,
)

# -- WorkspaceLock -----------------------------------------------------------------------------


def _every_way_to_take(lock: WorkspaceLock) -> list[Callable[[], Any]]:
    return [
        lock.try_acquire,
        lambda: lock.acquire(timeout=60),
        lambda: lock.acquire(timeout=60, cancel=threading.Event()),
        lock.acquire,
        lock.__enter__,
    ]


def test_second_sync_in_another_thread_is_refused_at_once_naming_the_first(
    tmp_path: Path,
) -> None:
    first = WorkspaceLock(tmp_path)
    with HeldInThread(first, name="first-sync"):
        # A second sync, through its own lock object or through the first's.
        for lock in (WorkspaceLock(tmp_path), first):
            for take in _every_way_to_take(lock):
                # A timeout of 60 s would fail the test (pytest-timeout) if it waited.
                with pytest.raises(WorkspaceBusy) as caught:
                    take()
                message = str(caught.value)
                assert f"pid {os.getpid()}" in message
                assert "first-sync" in message
                assert caught.value.path == tmp_path / SYNC_LOCK_FILE_NAME
                assert not isinstance(caught.value, LockTimeout)
        assert first.held
    assert not first.held


def test_second_sync_in_the_same_thread_is_refused(tmp_path: Path) -> None:
    with WorkspaceLock(tmp_path) as lock:
        for take in _every_way_to_take(WorkspaceLock(tmp_path)):
            with pytest.raises(WorkspaceBusy):
                take()
        with pytest.raises(WorkspaceBusy):
            lock.try_acquire()
        assert lock.held


def test_second_sync_in_another_process_is_refused_at_once_naming_the_first(
    tmp_path: Path,
) -> None:
    with PipedChild("spawn", hold_until_told, WorkspaceLock(tmp_path)) as first_sync:
        _, holder_pid = first_sync.recv()  # the first sync has started
        for take in _every_way_to_take(WorkspaceLock(tmp_path)):
            with pytest.raises(WorkspaceBusy) as caught:
                take()
            assert f"pid {holder_pid}" in str(caught.value)
            holder = caught.value.holder
            assert holder is not None
            assert holder.owner is not None
            assert holder.owner["pid"] == holder_pid
            assert holder.owner["tier"] == Tier.WORKSPACE_SYNC
        first_sync.send("release")
        first_sync.expect("released")
        assert first_sync.join() == 0
    with WorkspaceLock(tmp_path):
        pass


def test_sync_in_another_process_is_refused_naming_us(tmp_path: Path) -> None:
    with WorkspaceLock(tmp_path), Children() as children:
        children.start(attempt_sync, tmp_path)
        [outcomes] = children.results()
    assert [name for name, _ in outcomes] == ["WorkspaceBusy"] * 4
    for _, message in outcomes:
        assert f"pid {os.getpid()}" in message
        assert "delete" not in message.lower()


# -- BackendLock -------------------------------------------------------------------------------


def test_backend_lock_creates_the_parent_of_dest_but_not_dest(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "repos" / "pack-a"
    lock = BackendLock(dest)
    assert lock.path == tmp_path / "cache" / "repos" / ("pack-a" + BACKEND_LOCK_SUFFIX)
    assert lock.path.is_file()
    assert dest.parent.is_dir()
    assert not dest.exists()
    with lock:
        assert not dest.exists()
        record = json.loads(Path(str(lock.path) + OWNER_SUFFIX).read_text())
        assert record["pid"] == os.getpid()
        assert record["tier"] == Tier.BACKEND
    assert not dest.exists()
    assert lock.path.is_file()


def test_backend_lock_of_a_dest_spelled_with_dotdot_sits_beside_that_dest(
    tmp_path: Path,
) -> None:
    """``<ws>/sub/..`` names ``<ws>``: its lock is ``<ws>.grex-backend.lock``, not in ``sub``."""
    (tmp_path / "ws" / "sub").mkdir(parents=True)
    plain = BackendLock(tmp_path / "ws")
    dotted = BackendLock(tmp_path / "ws" / "sub" / "..")
    assert dotted.path.resolve() == plain.path
    with plain, pytest.raises(LockBusy):
        InThread(dotted.try_acquire).result()


def test_two_processes_fetching_into_one_dest_take_turns(tmp_path: Path) -> None:
    dest = tmp_path / "repos" / "pack"
    log = tmp_path / "audit.log"
    rounds = 40
    with Children() as children:
        start = children.barrier(2)
        pids = [children.start(fetch_repeatedly, dest, log, rounds, start) for _ in range(2)]
        assert sorted(children.results(timeout=3 * DEADLINE)) == sorted(pids)
    entries = read_audit(log)
    assert len(entries) == 2 * 2 * rounds
    # Serialised: every enter is followed by the same fetcher's exit.
    for enter, leave in zip(entries[::2], entries[1::2], strict=True):
        assert enter[0] == "enter"
        assert leave == ["exit", enter[1]]
    assert {entry[1] for entry in entries} == {f"pid-{pid}" for pid in pids}


def test_wiping_dest_while_held_does_not_free_the_lock(tmp_path: Path) -> None:
    dest = tmp_path / "repos" / "pack"
    dest.mkdir(parents=True)
    (dest / "objects").mkdir()
    (dest / "objects" / "blob").write_text("data")
    lock = BackendLock(dest)
    inode = lock.path.stat().st_ino
    with lock:
        shutil.rmtree(dest)
        assert lock.path.stat().st_ino == inode
        with Children() as children:
            children.start(try_lock, BackendLock(dest))
            children.start(try_lock, BackendLock(tmp_path / "repos" / ".." / "repos" / "pack"))
            assert children.results() == ["LockBusy", "LockBusy"]
        with pytest.raises(LockBusy):
            InThread(BackendLock(dest).try_acquire).result()
        # Re-cloning into a fresh dest changes nothing either.
        dest.mkdir()
        shutil.rmtree(dest)
        with pytest.raises(LockTimeout):
            InThread(lambda: BackendLock(dest).acquire(timeout=0.05)).result()
    assert lock.path.stat().st_ino == inode
    with Children() as children:
        children.start(try_lock, BackendLock(dest))
        assert children.results() == ["acquired"]
