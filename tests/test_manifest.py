"""ManifestLock: readers share, writers exclude, a stream of readers does not starve a writer."""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

import pytest
from support import (
    DEADLINE,
    Children,
    HeldInThread,
    InThread,
    append_line,
    append_under_write,
    audit,
    check_whole_lines,
    holder_record,
    manifest_line,
    must_wait,
    owner_record,
    read_audit,
    read_then_note_exit,
    read_together,
    read_until,
    try_lock,
    try_read,
    wait_until_blocked,
)

from grex_locks import (
    LockBusy,
    LockCancelled,
    LockTimeout,
    ManifestLock,
    Tier,
)


@pytest.fixture
def lock(tmp_path: Path) -> ManifestLock:
    return ManifestLock(tmp_path / ".grex.lock")


def _lines_by_writer(data: Path) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for line in data.read_bytes().splitlines():
        record = json.loads(line)
        seen.setdefault(record["worker"], []).append(record["seq"])
    return seen


# -- concurrent appends ------------------------------------------------------------------------


def test_threads_appending_under_write_lose_and_tear_no_line(
    lock: ManifestLock, tmp_path: Path
) -> None:
    data = tmp_path / "manifest.jsonl"
    writers, count = 4, 25
    go, stop = threading.Event(), threading.Event()

    def write_lines(worker: str) -> None:
        must_wait(go, "the start signal")
        for seq in range(count):
            with lock.write(timeout=DEADLINE):
                append_line(data, manifest_line(worker, seq))

    def read_lines() -> int:
        must_wait(go, "the start signal")
        return read_until(lock, data, stop)

    readers = [InThread(read_lines, name=f"reader-{n}") for n in range(2)]
    threads = [
        InThread(functools.partial(write_lines, f"t{n}"), name=f"writer-{n}")
        for n in range(writers)
    ]
    go.set()
    for thread in threads:
        thread.result()
    stop.set()
    for reader in readers:
        assert reader.result() >= 1
    assert check_whole_lines(data.read_bytes()) == writers * count
    assert _lines_by_writer(data) == {f"t{n}": list(range(count)) for n in range(writers)}


def test_processes_appending_under_write_lose_and_tear_no_line(
    lock: ManifestLock, tmp_path: Path
) -> None:
    data = tmp_path / "manifest.jsonl"
    writers, count = 4, 250
    with Children("spawn") as children:
        # The writers start together, so that only the lock keeps their lines apart.
        start, stop = children.barrier(writers), children.event()
        for n in range(writers):
            children.start(append_under_write, lock, data, f"p{n}", count, start)
        # A reader in another process, and one in this process, read all along.
        children.start(read_until, lock, data, stop)
        local_stop = threading.Event()
        local_reader = InThread(lambda: read_until(lock, data, local_stop))
        # The writers finish by themselves; then the readers are told to stop.
        pending = children.processes[:writers]
        for process in pending:
            process.join(4 * DEADLINE)
            assert process.exitcode == 0, f"writer {process.pid} exited with {process.exitcode}"
        stop.set()
        local_stop.set()
        results = children.results()
        assert local_reader.result() >= 1
    assert results[:writers] == [count] * writers
    assert results[writers] >= 1
    assert check_whole_lines(data.read_bytes()) == writers * count
    assert _lines_by_writer(data) == {f"p{n}": list(range(count)) for n in range(writers)}


# -- readers share -----------------------------------------------------------------------------


def test_readers_in_two_processes_and_a_thread_are_inside_read_at_once(
    lock: ManifestLock,
) -> None:
    with Children("spawn") as children:
        everyone_inside = children.barrier(3)
        pids = [children.start(read_together, lock, everyone_inside) for _ in range(2)]
        # This thread is the third reader: the barrier opens only if all three are inside.
        with lock.read(timeout=DEADLINE):
            everyone_inside.wait(DEADLINE)
            assert owner_record(lock.path) is None
        assert children.results() == pids


def test_readers_in_several_threads_are_inside_read_at_once(lock: ManifestLock) -> None:
    readers = 4
    everyone_inside = threading.Barrier(readers)

    def read() -> bool:
        with lock.read(timeout=DEADLINE):
            everyone_inside.wait(DEADLINE)
            return lock.held

    threads = [InThread(read) for _ in range(readers)]
    assert [thread.result() for thread in threads] == [True] * readers


# -- writers wait for readers ------------------------------------------------------------------


def test_writer_waits_for_a_reader_in_another_process(lock: ManifestLock, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with Children("spawn") as children:
        held, release = children.event(), children.event()
        reader_pid = children.start(read_then_note_exit, lock, log, held, release)
        must_wait(held, "the reader to be inside")
        # Another reader is let in meanwhile.
        with lock.read(timeout=0):
            pass

        def write() -> None:
            with lock.write(timeout=DEADLINE):
                audit(log, "writer-enter")

        writer = InThread(write)
        wait_until_blocked([lock.path], os.getpid())
        with pytest.raises(LockBusy):
            lock.try_acquire()
        with pytest.raises(LockTimeout):
            lock.write(timeout=0.05)
        # The waiting writer holds back later readers of this process.
        with pytest.raises(LockTimeout):
            lock.read(timeout=0)
        release.set()
        writer.result()
        assert children.results() == [reader_pid]
    assert read_audit(log) == [["reader-exit"], ["writer-enter"]]


def test_writer_waits_for_a_reader_in_another_thread(lock: ManifestLock, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    held, release = threading.Event(), threading.Event()

    def read() -> None:
        with lock.read(timeout=DEADLINE):
            held.set()
            must_wait(release, "the release signal")
            audit(log, "reader-exit")

    reader = InThread(read)
    must_wait(held, "the reader to be inside")
    with pytest.raises(LockBusy):
        lock.try_acquire()
    with pytest.raises(LockTimeout):
        lock.write(timeout=0.05)
    release.set()
    with lock.write(timeout=DEADLINE):
        audit(log, "writer-enter")
    reader.result()
    assert read_audit(log) == [["reader-exit"], ["writer-enter"]]


def test_writer_excludes_readers_and_writers(lock: ManifestLock) -> None:
    with lock.write():
        with pytest.raises(LockBusy):
            lock.read()
        with pytest.raises(LockTimeout):
            InThread(lambda: lock.read(timeout=0.05)).result()
        with pytest.raises(LockBusy):
            InThread(lock.try_acquire).result()
        with Children("spawn") as children:
            children.start(try_read, lock)
            children.start(try_lock, ManifestLock(lock.path))
            assert children.results() == ["LockTimeout", "LockBusy"]


def test_a_stream_of_readers_does_not_starve_a_writer(lock: ManifestLock) -> None:
    """Readers overlap in a relay (none leaves before the next is in); a writer still gets in.

    Each reader stays inside until another reader has entered after it, or
    ``linger`` seconds pass — so without writer preference some reader always
    holds the lock and a writer waits forever (its timeout fails the test).
    """
    readers, linger = 4, 0.25
    cond = threading.Condition()
    entries = 0
    stop = threading.Event()

    def entered_after(count: int) -> bool:
        return entries > count or stop.is_set()

    def relay() -> int:
        nonlocal entries
        mine = 0
        while not stop.is_set():
            with lock.read(timeout=DEADLINE), cond:
                entries += 1
                me = entries
                cond.notify_all()
                cond.wait_for(functools.partial(entered_after, me), timeout=linger)
            mine += 1
        return mine

    threads = [InThread(relay, name=f"relay-{n}") for n in range(readers)]
    try:
        for _ in range(3):
            with cond:
                # Let the relay run a while before the writer comes.
                assert cond.wait_for(functools.partial(entered_after, entries + 20), DEADLINE)
                arrived = entries
            with lock.write(timeout=DEADLINE), cond:
                overtaken = entries - arrived
            # Readers that were already inside (or in line before the writer) may
            # finish; the writer must not wait for an unbounded stream of new ones.
            assert overtaken <= 2 * readers, f"{overtaken} readers went first"
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        cycles = [thread.result() for thread in threads]
    assert all(cycles)


# -- owner records -----------------------------------------------------------------------------


def test_shared_holds_write_no_owner_record_and_exclusive_ones_do(lock: ManifestLock) -> None:
    inside, leave = threading.Event(), threading.Event()

    def read() -> object:
        with lock.read(timeout=DEADLINE):
            inside.set()
            must_wait(leave, "the signal to leave")
            return owner_record(lock.path)

    with lock.read():
        assert owner_record(lock.path) is None
        other = InThread(read)
        must_wait(inside, "the second reader")
        assert owner_record(lock.path) is None
        leave.set()
        assert other.result() is None
    assert owner_record(lock.path) is None
    for take in (lock.write, lock.acquire, lock.try_acquire):
        with take():
            record = holder_record(lock.path)
            assert record["pid"] == os.getpid()
            assert record["tier"] == Tier.MANIFEST
            assert record["thread"] == threading.current_thread().name
        assert owner_record(lock.path) is None
    with lock:
        assert holder_record(lock.path)["pid"] == os.getpid()
    assert owner_record(lock.path) is None


# -- timeout and cancel ------------------------------------------------------------------------


def test_read_and_write_take_timeout_and_cancel(lock: ManifestLock) -> None:
    already = threading.Event()
    already.set()
    with pytest.raises(LockCancelled):
        lock.read(cancel=already)
    with pytest.raises(LockCancelled):
        lock.write(cancel=already)
    with pytest.raises(ValueError, match="negative"):
        lock.read(timeout=-1)
    with HeldInThread(lock.write):  # a writer inside, in another thread
        with pytest.raises(LockTimeout):
            lock.read(timeout=0.05)
        with pytest.raises(LockTimeout):
            lock.write(timeout=0)
        for take in (lock.read, lock.write):
            cancel = threading.Event()
            canceller = InThread(cancel.set)
            with pytest.raises(LockCancelled):
                take(cancel=cancel)
            canceller.result()
    with lock.write(timeout=0):
        pass
