"""The behaviour every file lock shares, one test body each, run over every lock kind."""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import socket
import threading
from pathlib import Path

import psutil
import pytest
from support import (
    LOCK_KINDS,
    AnyLock,
    HeldInThread,
    InThread,
    LockKind,
    PipedChild,
    hold_until_told,
    try_in_child,
    until,
)

import grex_locks
from grex_locks import LockBusy, LockTimeout, WorkspaceBusy, WorkspaceLock
from grex_locks._core.tiers import held_tiers

#: Ways of reaching one lock file other than the spelling it was created with.
SPELLINGS = ("second object", "relative", "dotdot", "symlinked dir", "hard link")


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    return base


def _spell(
    kind: LockKind, tmp_path: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> AnyLock:
    """A second lock object reaching ``kind``'s lock file in ``tmp_path/base`` by ``spelling``."""
    base = _base(tmp_path)
    if spelling == "second object":
        return kind.make(base)
    if spelling == "relative":
        monkeypatch.chdir(tmp_path)
        return kind.make(Path("base"))
    if spelling == "dotdot":
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        return kind.make(tmp_path / "elsewhere" / ".." / "base")
    if spelling == "symlinked dir":
        link = tmp_path / "link"
        link.symlink_to(base, target_is_directory=True)
        return kind.make(link)
    assert spelling == "hard link"
    other = tmp_path / "other"
    other.mkdir()
    kind.make(base)  # make sure the original lock file exists
    os.link(kind.lock_file(base), kind.lock_file(other))
    return kind.make(other)


def test_constructor_creates_the_lock_file_and_its_parents(kind: LockKind, tmp_path: Path) -> None:
    base = tmp_path / "deep" / "er" / "base"
    lock = kind.make(base)
    assert lock.path == kind.lock_file(base)
    assert lock.path.is_absolute()
    assert lock.path.is_file()
    assert not lock.held


def test_context_manager_acquires_and_releases(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    with lock as entered:
        assert entered is lock
        assert lock.held
        assert try_in_child(lock) == kind.busy_error.__name__
    assert not lock.held
    assert try_in_child(lock) == "acquired"


def test_acquire_returns_a_context_manager_that_releases(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    with lock.acquire():
        assert lock.held
    assert not lock.held

    hold = lock.acquire()
    assert lock.held
    hold.release()
    assert not lock.held

    lock.acquire()
    lock.release()
    assert not lock.held
    assert try_in_child(lock) == "acquired"


@pytest.mark.parametrize("same_object", [True, False], ids=["same object", "second object"])
def test_try_acquire_is_busy_while_another_thread_holds(
    kind: LockKind, tmp_path: Path, same_object: bool
) -> None:
    lock = kind.make(_base(tmp_path))
    contender = lock if same_object else kind.make(_base(tmp_path))
    with HeldInThread(lock):
        with pytest.raises(kind.busy_error) as caught:
            contender.try_acquire()
        assert caught.value.path == kind.lock_file(_base(tmp_path))
        assert contender.held == same_object
    with contender.try_acquire():
        assert contender.held


def test_try_acquire_is_busy_while_another_process_holds(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    # forkserver: the child gets the lock by pickling, as a pool worker would.
    with PipedChild("forkserver", hold_until_told, lock) as holder:
        assert holder.recv()[0] == "held"
        with pytest.raises(kind.busy_error) as caught:
            lock.try_acquire()
        assert caught.value.path == lock.path
        assert not lock.held
        holder.send("release")
        holder.expect("released")
        assert holder.join() == 0
    with lock.try_acquire():
        assert lock.held


@pytest.mark.timeout(20)
@pytest.mark.parametrize("spelling", ["same object", *SPELLINGS])
def test_same_thread_reentry_is_busy_at_once(
    kind: LockKind, tmp_path: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = kind.make(_base(tmp_path))
    again = lock if spelling == "same object" else _spell(kind, tmp_path, spelling, monkeypatch)
    with lock:
        # A wait here would be a wait on ourselves: every entry must refuse at once.
        with pytest.raises(kind.busy_error):
            again.try_acquire()
        with pytest.raises(kind.busy_error):
            again.acquire()
        with pytest.raises(kind.busy_error):
            again.acquire(timeout=60)
        with pytest.raises(kind.busy_error), again:
            pytest.fail("re-entered a held lock")
        assert lock.held
        assert held_tiers() == (kind.tier,)
        assert try_in_child(lock) == kind.busy_error.__name__
    with again.try_acquire():
        pass


@pytest.mark.parametrize("mode", ["raise", "warn", "off"])
def test_reentry_is_refused_in_every_tier_check_mode(
    kind: LockKind, tmp_path: Path, mode: str
) -> None:
    grex_locks.set_tier_check(mode)  # type: ignore[arg-type]
    lock = kind.make(_base(tmp_path))
    with lock, pytest.raises(kind.busy_error):
        kind.make(_base(tmp_path)).try_acquire()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_path_to_the_file_is_one_lock(
    kind: LockKind, tmp_path: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = kind.make(_base(tmp_path))
    other = _spell(kind, tmp_path, spelling, monkeypatch)
    with HeldInThread(lock):
        with pytest.raises(kind.busy_error):
            other.try_acquire()
        assert try_in_child(other) == kind.busy_error.__name__
    with HeldInThread(other), pytest.raises(kind.busy_error):
        lock.try_acquire()
    with other.try_acquire():
        assert try_in_child(lock) == kind.busy_error.__name__


def test_releasing_an_unheld_lock_is_a_runtime_error(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    with pytest.raises(RuntimeError):
        lock.release()
    hold = lock.acquire()
    hold.release()
    with pytest.raises(RuntimeError):
        hold.release()
    with pytest.raises(RuntimeError):
        lock.release()
    assert not lock.held


def test_releasing_from_another_thread_is_a_runtime_error(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    hold = lock.acquire()
    try:
        with pytest.raises(RuntimeError):
            InThread(lock.release).result()
        with pytest.raises(RuntimeError):
            InThread(hold.release).result()
        assert lock.held
        assert try_in_child(lock) == kind.busy_error.__name__
    finally:
        hold.release()
    assert try_in_child(lock) == "acquired"


@pytest.mark.parametrize("timeout", [-1, -0.001, -math.inf])
def test_negative_timeout_is_a_value_error(kind: LockKind, tmp_path: Path, timeout: float) -> None:
    lock = kind.make(_base(tmp_path))
    try:
        with pytest.raises(ValueError, match="timeout"):
            lock.acquire(timeout=timeout)
    finally:
        if lock.held:
            lock.release()
    assert not lock.held


def test_pickles_as_its_constructor_argument_never_as_held(kind: LockKind, tmp_path: Path) -> None:
    base = _base(tmp_path)
    lock = kind.make(base)
    fresh = pickle.dumps(kind.make(base))
    assert pickle.dumps(lock) == fresh
    with lock:
        data = pickle.dumps(lock)
        assert data == fresh
        copy = pickle.loads(data)  # noqa: S301 - our own bytes
        assert type(copy) is type(lock)
        assert copy.path == lock.path
        assert not copy.held
        with pytest.raises(kind.busy_error):
            copy.try_acquire()
        with pytest.raises(kind.busy_error):
            InThread(copy.try_acquire).result()
    with copy.try_acquire():
        assert copy.held
        assert not lock.held


def test_relative_path_is_made_absolute_at_construction(
    kind: LockKind, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lock = kind.make(Path("rel"))
    expected = kind.lock_file(tmp_path / "rel")
    assert lock.path == expected
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert lock.path == expected
    with lock:
        assert expected.is_file()
        assert pickle.loads(pickle.dumps(lock)).path == expected  # noqa: S301
    assert list(elsewhere.iterdir()) == []


def test_lock_file_is_never_truncated_or_deleted(kind: LockKind, tmp_path: Path) -> None:
    base = _base(tmp_path)
    lock_file = kind.lock_file(base)
    lock_file.write_bytes(b"someone's bytes\n")
    inode = lock_file.stat().st_ino
    lock = kind.make(base)
    for _ in range(3):
        with lock:
            pass
    lock.try_acquire().release()
    other = kind.make(base)
    with HeldInThread(other), pytest.raises(kind.busy_error):
        lock.try_acquire()
    del lock, other
    gc.collect()
    assert lock_file.read_bytes() == b"someone's bytes\n"
    assert lock_file.stat().st_ino == inode


def test_owner_record_names_the_holder_and_is_cleared_on_release(
    kind: LockKind, tmp_path: Path
) -> None:
    lock = kind.make(_base(tmp_path))
    record_file = lock.path.with_name(lock.path.name + grex_locks.OWNER_SUFFIX)

    def hold_and_read() -> dict[str, object]:
        with lock:
            record: dict[str, object] = json.loads(record_file.read_bytes())
            return record

    thread_name = "record-reader"
    box: dict[str, dict[str, object]] = {}
    thread = threading.Thread(target=lambda: box.update(r=hold_and_read()), name=thread_name)
    thread.start()
    thread.join(10)
    record = box["r"]
    assert record["pid"] == os.getpid()
    assert record["create_time"] == psutil.Process().create_time()
    assert record["hostname"] == socket.gethostname()
    assert record["thread"] == thread_name
    assert record["tier"] == int(kind.tier)
    assert isinstance(record["acquired_at"], float)
    assert isinstance(record["argv"], list)
    assert all(isinstance(arg, str) for arg in record["argv"])
    assert not record_file.exists() or record_file.read_bytes().strip() == b""


def test_workspace_lock_never_waits(tmp_path: Path) -> None:
    lock = WorkspaceLock(tmp_path)
    contender = WorkspaceLock(tmp_path)
    with HeldInThread(lock):
        for attempt in (
            contender.try_acquire,
            contender.acquire,
            lambda: contender.acquire(timeout=60),
            lambda: contender.acquire(cancel=threading.Event()),
        ):
            with pytest.raises(WorkspaceBusy):
                attempt()
        with pytest.raises(WorkspaceBusy), contender:
            pytest.fail("entered a held workspace lock")
    with PipedChild("fork", hold_until_told, lock) as holder:
        holder.recv()
        with pytest.raises(WorkspaceBusy):
            contender.acquire(timeout=60)
        holder.send("release")
        holder.expect("released")


@pytest.mark.parametrize("kind", [k for k in LOCK_KINDS if k.waits], ids=str)
def test_waiting_kinds_time_out_rather_than_report_busy(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(_base(tmp_path))
    with HeldInThread(lock):
        with pytest.raises(LockTimeout) as caught:
            kind.make(_base(tmp_path)).acquire(timeout=0.05)
        assert not isinstance(caught.value, LockBusy)
        assert caught.value.path == lock.path


def test_statistics_show_holder_thread_and_waiters(kind: LockKind, tmp_path: Path) -> None:
    lock = kind.make(tmp_path / "target")
    other = kind.make(tmp_path / "target")
    idle = lock.statistics()
    assert (idle.held, idle.holder_threads, idle.threads_waiting) == (False, (), 0)
    waiter = threading.Thread(target=lambda: other.acquire(timeout=10).release(), name="waiter")
    with lock:
        stats = lock.statistics()
        assert stats.held
        assert stats.exclusive
        assert stats.holder_threads == (threading.current_thread().name,)
        assert not other.statistics().held
        if kind.waits:
            waiter.start()
            until(lambda: other.statistics().threads_waiting == 1, "the waiter queued")
    if kind.waits:
        waiter.join(10)
        assert not waiter.is_alive()
    assert lock.statistics().holder_threads == ()


def test_statistics_never_count_a_thread_waiting_in_the_kernel_as_a_holder(
    kind: LockKind, tmp_path: Path
) -> None:
    if not kind.waits:
        pytest.skip(f"{kind} never waits")
    lock = kind.make(tmp_path / "target")
    with PipedChild("spawn", hold_until_told, kind.make(tmp_path / "target")) as holder:
        holder.expect(("held", holder.pid))
        # Through the in-process queue, then blocked in the kernel: one with a
        # deadline (a helper thread's flock), one without (flock directly).
        waiters = [
            threading.Thread(target=lambda: lock.acquire(timeout=10).release(), name="timed"),
            threading.Thread(target=lambda: kind.make(tmp_path / "target").acquire().release()),
        ]
        for waiter in waiters:
            waiter.start()
        until(lambda: lock.statistics().threads_waiting == 2, "both waiters counted as waiting")
        stats = lock.statistics()
        assert stats.holder_threads == ()
        assert not stats.held
        assert not stats.exclusive
        holder.send("let go")
        holder.expect("released")
        for waiter in waiters:
            waiter.join(10)
            assert not waiter.is_alive()
    assert lock.statistics().holder_threads == ()
    assert lock.statistics().threads_waiting == 0
