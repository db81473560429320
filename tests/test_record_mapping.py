"""The owner record written through a mapped page, judged from other processes.

A holder stores its record into a shared mapping of the record file where
that is safe (see ``grex_locks/_core/mapped_record.py``). What must hold:
another process reads every record the moment it is stored and reads
whitespace once it is released; a record file emptied behind the holder's
back (by hand, or by a holder of another kind that empties it on release)
never crashes the holder with ``SIGBUS``; records other users may write are
never mapped; the number of mappings is bounded. And a scheduler that looks
for a free slot with one ``flock`` per slot leaves no slot locked behind it.
"""

from __future__ import annotations

import fcntl
import gc
import multiprocessing.connection
import os
import subprocess
import sys
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import pytest
from support import (
    DEADLINE,
    PipedChild,
    holder_record,
    must_wait,
    owner_record,
    record_bytes,
    record_file,
    third_process_can_take,
    wait_until_blocked,
)

import grex_locks
from grex_locks._core import mapped_record

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="mappings are Linux-only here")


def mapped_files(pid: int) -> set[str]:
    """The files process ``pid`` has mapped, as the kernel lists them."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def read_in_other_process(path: Path) -> bytes:
    """``path``'s bytes as a separate process (cat) reads them."""
    done = subprocess.run(["cat", str(path)], capture_output=True, check=True, timeout=DEADLINE)
    return done.stdout


def test_each_record_is_seen_at_once_by_another_process(pack: Path) -> None:
    lock = grex_locks.PackLock(pack)
    record = record_file(lock.path)
    for round_ in range(3):
        with lock:
            seen = read_in_other_process(record)
            assert b'"pid":%d' % os.getpid() in seen, seen
            assert str(record) in mapped_files(os.getpid()), "the record was written with pwrite"
            assert holder_record(lock.path)["pid"] == os.getpid()
        assert not read_in_other_process(record).strip(), f"round {round_}: not blanked"
        assert third_process_can_take(lock.path)


def _hold_when_told(conn: multiprocessing.connection.Connection, pack: str) -> None:
    """Take and release the pack lock each time the test says so ("take"/"let go"/"stop")."""
    lock = grex_locks.PackLock(pack)
    while (message := conn.recv()) != "stop":
        if message == "take":
            lock.acquire(timeout=DEADLINE)
            conn.send(("held", os.getpid()))
        else:
            lock.release()
            conn.send("released")


def hold_mapped(child: PipedChild) -> None:
    """Have ``child`` (running :func:`_hold_when_told`) hold the lock with its record mapped.

    Its first hold creates the record file; the second maps it.
    """
    child.send("take")
    child.expect(("held", child.pid))
    child.send("let go")
    child.expect("released")
    child.send("take")
    child.expect(("held", child.pid))


@pytest.mark.parametrize("when", ["while held", "between holds"])
def test_a_record_emptied_behind_the_holder_never_crashes_it(pack: Path, when: str) -> None:
    lock_file = pack / ".grex-lock"
    record = record_file(lock_file)
    with PipedChild("spawn", _hold_when_told, str(pack)) as child:
        hold_mapped(child)
        if when == "between holds":
            child.send("let go")
            child.expect("released")
            os.truncate(record, 0)
            child.send("take")
            child.expect(("held", child.pid))
            assert holder_record(lock_file)["pid"] == child.pid
        else:
            os.truncate(record, 0)
        child.send("let go")
        child.expect("released")
        child.send("stop")
        assert child.join() == 0, "the holder died (SIGBUS?)"
    data = record_bytes(lock_file)
    assert data is not None
    assert not data.strip()
    assert third_process_can_take(lock_file)


def _foreign_holder(lock_file: str, record: str, held: MpEvent, go: MpEvent) -> None:
    """A holder of another kind: flock, a record written whole, emptied on release."""
    fd = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    Path(record).write_text(f'{{"pid": {os.getpid()}, "create_time": 1.0}}')
    held.set()
    go.wait(DEADLINE)
    Path(record).write_bytes(b"")
    fcntl.flock(fd, fcntl.LOCK_UN)


def _wait_then_hold(conn: multiprocessing.connection.Connection, pack: str) -> None:
    lock = grex_locks.PackLock(pack)
    with lock:  # maps the record file
        pass
    conn.send("mapped")
    conn.recv()
    with lock.acquire(timeout=DEADLINE):
        conn.send(("held", os.getpid()))
        conn.recv()
    conn.send("released")


def test_a_holder_that_empties_the_record_on_release_is_followed_safely(pack: Path) -> None:
    lock_file = pack / ".grex-lock"
    ctx = multiprocessing.get_context("fork")
    held, go = ctx.Event(), ctx.Event()
    with PipedChild("spawn", _wait_then_hold, str(pack)) as waiter:
        waiter.expect("mapped")
        foreign = ctx.Process(
            target=_foreign_holder, args=(str(lock_file), str(record_file(lock_file)), held, go)
        )
        foreign.start()
        try:
            must_wait(held, "the foreign holder to take the lock")
            waiter.send("wait for it")
            wait_until_blocked(lock_file, waiter.pid)
            go.set()
            waiter.expect(("held", waiter.pid))
            assert holder_record(lock_file)["pid"] == waiter.pid
            waiter.send("let go")
            waiter.expect("released")
            assert waiter.join() == 0
        finally:
            go.set()
            foreign.join(DEADLINE)
    assert foreign.exitcode == 0
    assert owner_record(lock_file) is None
    assert third_process_can_take(lock_file)


def test_a_record_others_may_write_is_never_mapped(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # group-shared workspace: records are made group-writable
    lock = grex_locks.PackLock(shared)
    with lock:
        record = record_file(lock.path)
        assert record.stat().st_mode & 0o020, "the record should be group-writable here"
        assert str(record) not in mapped_files(os.getpid())
        assert holder_record(lock.path)["pid"] == os.getpid()
    assert owner_record(lock.path) is None


def test_a_record_made_writable_by_others_after_mapping_is_unmapped(pack: Path) -> None:
    lock_file = pack / ".grex-lock"
    record = record_file(lock_file)
    with PipedChild("spawn", _hold_when_told, str(pack)) as child:
        hold_mapped(child)
        assert str(record) in mapped_files(child.pid)
        child.send("let go")
        child.expect("released")
        # As the creator of a record in a shared directory does, a moment
        # after creating it: from now on others may empty it.
        record.chmod(0o664)
        child.send("take")
        child.expect(("held", child.pid))
        assert str(record) not in mapped_files(child.pid), "still mapped: a store could fault"
        assert holder_record(lock_file)["pid"] == child.pid
        child.send("let go")
        child.expect("released")
        child.send("stop")
        assert child.join() == 0
    assert owner_record(lock_file) is None
    assert third_process_can_take(lock_file)


def test_mappings_are_bounded_and_go_with_their_lock_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.collect()  # lock objects of earlier tests give their mappings back first
    monkeypatch.setattr(mapped_record, "MAX_MAPPINGS", mapped_record._mapped + 3)
    locks = [grex_locks.PackLock(tmp_path / f"p{i}") for i in range(6)]
    for lock in locks:
        for _ in range(2):
            with lock:
                assert holder_record(lock.path)["pid"] == os.getpid()
            assert owner_record(lock.path) is None
    records = {str(record_file(lock.path)) for lock in locks}
    assert len(records & mapped_files(os.getpid())) == 3
    del lock, locks
    gc.collect()
    assert not records & mapped_files(os.getpid()), "a collected lock object left its mapping"


def _hold_every_slot(conn: multiprocessing.connection.Connection, slots_dir: str, n: int) -> None:
    grex_locks.set_tier_check("off")  # one thread holds every permit
    scheduler = grex_locks.Scheduler(n, slots_dir=slots_dir)
    permits = [scheduler.acquire(timeout=DEADLINE) for _ in range(n)]
    conn.send("held")
    conn.recv()
    for permit in permits:
        permit.release()
    conn.send("released")


def test_refused_try_acquires_leave_no_slot_locked(tmp_path: Path) -> None:
    n = 4
    slots_dir = tmp_path / "slots"
    scheduler = grex_locks.Scheduler(n, slots_dir=slots_dir)
    with PipedChild("spawn", _hold_every_slot, str(slots_dir), n) as holder:
        holder.expect("held")
        for _ in range(50):
            with pytest.raises(grex_locks.PermitsBusy):
                scheduler.try_acquire()
        holder.send("let go")
        holder.expect("released")
        assert holder.join() == 0
    slot_files = sorted(slots_dir.glob("slot-*.lock"))
    assert len(slot_files) == n
    for slot in slot_files:
        assert third_process_can_take(slot), f"{slot} left locked by a refused try"
    with scheduler.try_acquire() as permit:
        assert permit.slot is not None
        assert not third_process_can_take(permit.slot)
