"""The owner record is always at the record path, and only the holder ever replaces it.

A waiter opens the record file before it blocks (so that its own record is
quick to write once the lock is handed over). It does not hold the lock
then, so whatever it finds at the record path it must leave as it is: only
the holder may replace a record file that cannot be overwritten in place.
And processes that take a brand-new lock at the same moment all create the
one record file between them: none replaces the one another just created.

Judged from outside: the record's bytes as this test process reads them
while another process holds the lock.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import threading
from multiprocessing.synchronize import Barrier as MpBarrier
from pathlib import Path

import pytest
from support import (
    DEADLINE,
    Children,
    PipedChild,
    hold_until_told,
    holder_record,
    owner_record,
    record_bytes,
    record_file,
    third_process_can_take,
    wait_until_blocked,
)

import grex_locks


def _wait_then_hold(conn: multiprocessing.connection.Connection, pack: str, how: str) -> None:
    """When told, wait for the pack lock (``how``: plain, timeout=, cancel=); hold until told."""
    lock = grex_locks.PackLock(pack)
    conn.recv()
    if how == "plain":
        hold = lock.acquire()
    elif how == "timeout":
        hold = lock.acquire(timeout=DEADLINE)
    else:
        hold = lock.acquire(cancel=threading.Event())
    with hold:
        conn.send(("held", os.getpid()))
        conn.recv()
    conn.send("released")


@pytest.mark.parametrize("how", ["plain", "timeout", "cancel"])
def test_a_waiter_leaves_a_record_file_it_cannot_overwrite_to_the_holder(
    tmp_path: Path, pack: Path, how: str
) -> None:
    lock_file = pack / ".grex-lock"
    with (
        PipedChild("spawn", hold_until_told, grex_locks.PackLock(pack)) as holder,
        PipedChild("spawn", _wait_then_hold, str(pack), how) as waiter,
    ):
        holder.expect(("held", holder.pid))
        written = record_bytes(lock_file)
        # A second link makes the record file unfit to overwrite in place: the
        # next holder will replace it. The waiter, not holding yet, must not.
        os.link(record_file(lock_file), tmp_path / "second-link")
        waiter.send("wait")
        wait_until_blocked(lock_file, waiter.pid)
        assert record_bytes(lock_file) == written, "a waiter changed the holder's record"
        assert holder_record(lock_file)["pid"] == holder.pid

        holder.send("let go")
        holder.expect("released")
        waiter.expect(("held", waiter.pid))
        assert holder_record(lock_file)["pid"] == waiter.pid
        assert os.stat(record_file(lock_file)).st_nlink == 1, "the holder did not replace it"
        waiter.send("let go")
        waiter.expect("released")
        assert waiter.join() == 0
        assert holder.join() == 0
    assert owner_record(lock_file) is None
    assert third_process_can_take(lock_file)


def _take_new_locks_together(base: str, locks: int, start: MpBarrier) -> list[str]:
    """Take ``locks`` brand-new pack locks, each at the same moment as the other children.

    Returns what was wrong: each time the record read inside the lock was not ours.
    """
    me = os.getpid()
    wrong = []
    for n in range(locks):
        lock = grex_locks.PackLock(Path(base, str(n)))
        start.wait(DEADLINE)
        with lock.acquire(timeout=DEADLINE):
            record = owner_record(lock.path)
            if record is None or record["pid"] != me:
                wrong.append(f"lock {n}: {record}")
    return wrong


def test_processes_taking_a_new_lock_at_once_each_find_their_own_record(tmp_path: Path) -> None:
    locks, processes = 40, 4
    for n in range(locks):
        (tmp_path / str(n)).mkdir()
    with Children("fork") as children:
        start = children.barrier(processes)
        for _ in range(processes):
            children.start(_take_new_locks_together, str(tmp_path), locks, start)
        wrong = children.results(timeout=60)
    assert wrong == [[]] * processes
    for n in range(locks):
        assert owner_record(tmp_path / str(n) / ".grex-lock") is None
        assert not list((tmp_path / str(n)).glob(".*.tmp")), "a replacement was left behind"


def _hold_twice(conn: multiprocessing.connection.Connection, pack: str) -> None:
    """Hold the pack lock once; when told, take it again (same object) and hold until told."""
    lock = grex_locks.PackLock(pack)
    with lock:
        pass  # keeps a descriptor (and a mapping) on the record file
    conn.send("held once")
    conn.recv()
    with lock:
        conn.send(("held", os.getpid()))
        conn.recv()
    conn.send("released")


def test_a_record_file_replaced_since_the_last_hold_is_not_written_through(
    tmp_path: Path, pack: Path
) -> None:
    lock_file = pack / ".grex-lock"
    stray = tmp_path / "stray-link"
    with PipedChild("spawn", _hold_twice, str(pack)) as first:
        first.expect("held once")
        # A second link; the next holder replaces the record file, which
        # leaves the old one with a single link, elsewhere.
        os.link(record_file(lock_file), stray)
        with PipedChild("spawn", hold_until_told, grex_locks.PackLock(pack)) as other:
            other.expect(("held", other.pid))
            other.send("let go")
            other.expect("released")
            assert other.join() == 0
        assert not os.path.samefile(stray, record_file(lock_file)), "it was not replaced"
        stray_before = stray.read_bytes()
        first.send("take it again")
        first.expect(("held", first.pid))
        assert holder_record(lock_file)["pid"] == first.pid
        assert stray.read_bytes() == stray_before, "the record went through a stray link"
        first.send("let go")
        first.expect("released")
        assert first.join() == 0
    assert owner_record(lock_file) is None
    assert third_process_can_take(lock_file)
