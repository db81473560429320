"""The error tree: every error pickles, and says which lock and who holds it."""

from __future__ import annotations

import fcntl
import multiprocessing.connection
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HOLD_BACKSTOP, PipedChild, hold_until_told

from grex_locks import (
    BackendLock,
    LockBusy,
    LockCancelled,
    LockError,
    LockIOError,
    LockTimeout,
    PackLock,
    Tier,
    TierViolation,
    WorkspaceBusy,
)

LOCK_FILE = Path("/srv/packs/alpha/.grex-lock")

CONSTRUCTED: list[LockError] = [
    LockError(LOCK_FILE),
    LockError(LOCK_FILE, "a message"),
    LockBusy(LOCK_FILE),
    WorkspaceBusy(LOCK_FILE),
    LockTimeout(LOCK_FILE, waited=1.25),
    LockCancelled(LOCK_FILE),
    TierViolation(LOCK_FILE, held=Tier.BACKEND, requested=Tier.PER_PACK),
    LockIOError(LOCK_FILE),
]


def _round_trip(error: LockError) -> LockError:
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, LockError)
    return copy


def _assert_same(copy: LockError, error: LockError) -> None:
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.path == error.path
    if isinstance(error, LockTimeout):
        assert isinstance(copy, LockTimeout)
        assert copy.waited == error.waited
    if isinstance(error, TierViolation):
        assert isinstance(copy, TierViolation)
        assert (copy.held, copy.requested) == (error.held, error.requested)
        assert isinstance(copy.held, Tier)
        assert isinstance(copy.requested, Tier)


def test_the_tree() -> None:
    assert issubclass(LockError, Exception)
    assert issubclass(LockBusy, LockError)
    assert issubclass(WorkspaceBusy, LockBusy)
    assert issubclass(LockTimeout, LockError)
    assert issubclass(LockTimeout, TimeoutError)
    assert issubclass(LockCancelled, LockError)
    assert issubclass(TierViolation, LockError)
    assert issubclass(LockIOError, LockError)


@pytest.mark.parametrize("error", CONSTRUCTED, ids=lambda e: type(e).__name__)
def test_every_error_pickles(error: LockError) -> None:
    _assert_same(_round_trip(error), error)


@pytest.mark.parametrize("error", CONSTRUCTED, ids=lambda e: type(e).__name__)
def test_str_names_the_lock_and_never_advises_deleting(error: LockError) -> None:
    text = str(error)
    assert str(LOCK_FILE) in text or "a message" in text
    assert "delete" not in text.lower()


def test_constructed_fields() -> None:
    timeout = LockTimeout(LOCK_FILE, waited=1.25)
    assert timeout.waited == 1.25
    assert timeout.holder is None
    violation = TierViolation(LOCK_FILE, held=Tier.BACKEND, requested=Tier.PER_PACK)
    assert violation.held is Tier.BACKEND
    assert violation.requested is Tier.PER_PACK
    assert "BACKEND" in str(violation)
    assert "PER_PACK" in str(violation)
    assert LockBusy(LOCK_FILE).holder is None


@pytest.fixture
def held_elsewhere(pack: Path) -> Iterator[tuple[PackLock, int]]:
    """A pack lock held (with its owner record) by a child process; its pid."""
    lock = PackLock(pack)
    child = PipedChild("fork", hold_until_told, PackLock(pack))
    _, pid = child.recv()
    yield lock, pid
    child.send("release")
    child.expect("released")
    child.__exit__()


def _errors_meeting_a_holder(lock: PackLock) -> list[LockError]:
    errors: list[LockError] = []
    with pytest.raises(LockBusy) as busy:
        lock.try_acquire()
    errors.append(busy.value)
    with pytest.raises(LockTimeout) as timed_out:
        lock.acquire(timeout=0.05)
    errors.append(timed_out.value)
    return errors


def test_real_errors_name_the_lock_and_the_holder_pid(held_elsewhere: tuple[PackLock, int]) -> None:
    lock, pid = held_elsewhere
    for error in _errors_meeting_a_holder(lock):
        text = str(error)
        assert str(lock.path) in text
        assert str(pid) in text, f"{type(error).__name__} does not name holder {pid}: {text}"
        assert "delete" not in text.lower()
        copy = _round_trip(error)
        _assert_same(copy, error)


def test_real_errors_pickle_with_their_holder(held_elsewhere: tuple[PackLock, int]) -> None:
    lock, _ = held_elsewhere
    for error in _errors_meeting_a_holder(lock):
        assert isinstance(error, (LockBusy, LockTimeout))
        copy = _round_trip(error)
        assert isinstance(copy, (LockBusy, LockTimeout))
        assert (copy.holder is None) == (error.holder is None)


def _foreign_flock(conn: multiprocessing.connection.Connection, lock_file: Path) -> None:
    fd = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    conn.send("held")
    conn.poll(HOLD_BACKSTOP)


def test_holder_without_a_record_still_gives_a_sentence(pack: Path) -> None:
    lock = PackLock(pack)
    with PipedChild("fork", _foreign_flock, lock.path) as holder:
        holder.expect("held")
        with pytest.raises(LockBusy) as caught:
            lock.try_acquire()
        text = str(caught.value)
        assert str(lock.path) in text
        assert "delete" not in text.lower()
        _assert_same(_round_trip(caught.value), caught.value)
        holder.kill()


def test_real_tier_violation_cancel_and_io_errors(pack: Path, tmp_path: Path) -> None:
    errors: list[LockError] = []
    with BackendLock(tmp_path / "dest"), pytest.raises(TierViolation) as violation:
        PackLock(pack).acquire()
    errors.append(violation.value)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LockCancelled) as cancelled:
        PackLock(pack).acquire(cancel=cancel)
    errors.append(cancelled.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".grex-lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LockIOError) as refused:
        PackLock(tmp_path / "bad")
    errors.append(refused.value)
    for error in errors:
        assert error.path is not None
        assert str(error.path) in str(error)
        assert "delete" not in str(error).lower()
        _assert_same(_round_trip(error), error)


def test_holds_permits_and_groups_refuse_to_pickle_saying_what_to_send(tmp_path: Path) -> None:
    """A hold is one thread's; what travels is the lock object (as a fresh, unheld lock)."""
    import grex_locks

    scheduler = grex_locks.Scheduler(1, slots_dir=tmp_path / "slots")
    with scheduler.acquire() as permit:
        with pytest.raises(TypeError, match=r"scheduler permit .* cannot be sent"):
            pickle.dumps(permit)
        packs = [grex_locks.PackLock(tmp_path / "a"), grex_locks.PackLock(tmp_path / "b")]
        with grex_locks.acquire_all(packs) as group:
            with pytest.raises(TypeError, match=r"group of locks .* cannot be sent"):
                pickle.dumps(group)
            with pytest.raises(TypeError, match="send the lock object itself"):
                pickle.dumps(packs[0]._core.hold_of_current_thread())
            fresh = pickle.loads(pickle.dumps(packs[0]))  # noqa: S301 - our own bytes
            assert fresh.path == packs[0].path
            assert not fresh.held
