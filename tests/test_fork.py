"""Fork: a child forked while a lock is held neither holds nor can release it.

These tests use raw ``os.fork`` with pipes and ``os._exit``, so that nothing
but the library's own at-fork handling stands between parent and child.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from support import (
    DEADLINE,
    HOLD_BACKSTOP,
    START_METHODS,
    holder_record,
    try_in_child,
    try_lock,
    wait_for_exit,
)

from grex_locks import LockBusy, PackLock
from grex_locks._core import fair_queue, tiers


class Channel:
    """One end of a pair of pipes carrying text lines, every read with a deadline."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = b""

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)

    def send(self, line: str) -> None:
        os.write(self.write_fd, line.encode() + b"\n")

    def recv(self, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.read_fd], [], [], max(0.0, left))
            if not readable:
                raise AssertionError(f"nothing received within {timeout} s")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise AssertionError("the other end closed the pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode()
        if text.startswith("error "):
            raise AssertionError("the forked process failed:\n" + json.loads(text[6:]))
        return text

    def expect(self, expected: str, timeout: float = DEADLINE) -> None:
        line = self.recv(timeout)
        assert line == expected, f"received {line!r}, expected {expected!r}"


def channel_pair() -> tuple[Channel, Channel]:
    """Two connected channels: what one sends, the other receives."""
    a_to_b_read, a_to_b_write = os.pipe()
    b_to_a_read, b_to_a_write = os.pipe()
    return Channel(b_to_a_read, a_to_b_write), Channel(a_to_b_read, b_to_a_write)


def fork_running(body: Callable[[], None], report: Channel) -> int:
    """Fork a child that runs ``body`` and ``os._exit``s: 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the test, then exit
            with contextlib.suppress(OSError):
                report.send("error " + json.dumps(traceback.format_exc()))
        finally:
            os._exit(code)
    return pid


def test_child_forked_while_held_does_not_hold_and_cannot_release(pack: Path) -> None:
    lock = PackLock(pack)
    idle = PackLock(pack)  # inherited too, never held by anyone at the fork
    test_end, child_end = channel_pair()

    def child() -> None:
        child_end.send(
            f"{lock.held} {idle.held} {fair_queue.queues_in_use()} {tiers.held_tiers()!r}"
        )
        child_end.send(f"{try_lock(lock)} {try_lock(idle)}")
        try:
            lock.release()
        except RuntimeError:
            child_end.send("release refused")
        else:
            child_end.send("released the parent's lock")
        child_end.expect("free now")
        with lock.acquire(timeout=DEADLINE):
            mine = holder_record(lock.path)["pid"] == os.getpid()
        with idle.try_acquire():
            mine = mine and holder_record(idle.path)["pid"] == os.getpid()
        child_end.send(f"acquired {mine}")
        child_end.expect("exit")

    with lock:
        pid = fork_running(child, child_end)
        test_end.expect("False False 0 ()")
        test_end.expect("LockBusy LockBusy")
        test_end.expect("release refused")
        assert lock.held
        assert try_in_child(lock) == "LockBusy"
    # The parent let go while the child lives: the lock is free for everyone.
    assert try_in_child(lock) == "acquired"
    with lock.try_acquire():
        pass
    test_end.send("free now")
    test_end.expect("acquired True")
    test_end.send("exit")
    assert wait_for_exit(pid) == 0
    test_end.close()
    child_end.close()


def test_a_child_may_nest_its_own_with_inside_one_it_inherited(pack: Path) -> None:
    # The parent leaves its block and lets go; the child, still inside the
    # block it inherited, takes the lock in a block of its own, then leaves
    # both. Leaving the inherited block must raise nothing and touch nothing.
    lock = PackLock(pack)
    test_end, child_end = channel_pair()
    pid = -1
    try:
        with lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                child_end.expect("free now")
                with lock:
                    child_end.send(f"inner held {lock.held}")
                    child_end.expect("checked")
    except BaseException:
        if pid == 0:  # pragma: no cover - runs in the child
            with contextlib.suppress(OSError):
                child_end.send("error " + json.dumps(traceback.format_exc()))
            os._exit(1)
        raise
    if pid == 0:  # pragma: no cover - runs in the child
        child_end.send(f"outer left {lock.held}")
        os._exit(0)
    test_end.send("free now")
    test_end.expect("inner held True")
    assert try_in_child(lock) == "LockBusy"
    assert holder_record(lock.path)["pid"] == pid
    test_end.send("checked")
    test_end.expect("outer left False")
    assert wait_for_exit(pid) == 0
    assert try_in_child(lock) == "acquired"
    test_end.close()
    child_end.close()


def _take_inherited_when_told(channel: Channel, *locks: PackLock) -> None:
    """In a forked child: when told, take each inherited lock object in turn."""
    channel.send("alive")
    channel.expect("take it")
    mine = True
    for lock in locks:
        with lock.try_acquire():
            mine = mine and holder_record(lock.path)["pid"] == os.getpid()
    channel.send(f"acquired {mine}")
    channel.expect("exit")


def _hold_and_fork(
    channel: Channel, child_channel: Channel, lock: PackLock, idle: PackLock
) -> None:
    """Hold ``lock``, fork a child that inherits it, release when told."""
    lock.acquire()
    child = fork_running(lambda: _take_inherited_when_told(child_channel, lock, idle), channel)
    channel.send(str(child))
    channel.expect("release", timeout=HOLD_BACKSTOP)
    lock.release()
    channel.send("released")
    channel.expect("exit", timeout=HOLD_BACKSTOP)
    wait_for_exit(child)


@pytest.mark.parametrize("how", ["release", "SIGKILL"])
def test_parent_letting_go_frees_the_lock_while_its_forked_child_lives(
    pack: Path, how: str
) -> None:
    lock = PackLock(pack)
    idle = PackLock(pack)
    to_parent, parent_end = channel_pair()
    to_child, child_end = channel_pair()
    parent_pid = fork_running(lambda: _hold_and_fork(parent_end, child_end, lock, idle), parent_end)
    try:
        child_fd = os.pidfd_open(int(to_parent.recv()))
        to_child.expect("alive")
        assert try_in_child(lock) == "LockBusy"
        if how == "release":
            to_parent.send("release")
            to_parent.expect("released")
        else:
            os.kill(parent_pid, signal.SIGKILL)
            assert wait_for_exit(parent_pid) == -signal.SIGKILL
        assert select.select([child_fd], [], [], 0)[0] == [], "the forked child died"
        # The forked child lives on, yet the lock is free for everyone.
        assert try_in_child(lock) == "acquired"
        with lock.try_acquire():
            pass
        to_child.send("take it")
        to_child.expect("acquired True")
        to_child.send("exit")
        assert select.select([child_fd], [], [], DEADLINE)[0] == [child_fd]
        os.close(child_fd)
        if how == "release":
            to_parent.send("exit")
            assert wait_for_exit(parent_pid) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(parent_pid, signal.SIGKILL)
            os.waitpid(parent_pid, 0)
        for channel in (to_parent, parent_end, to_child, child_end):
            channel.close()


def _pool_try(lock: PackLock) -> str:
    """In a pool worker: take ``lock`` at once (a busy lock's ``LockBusy`` goes back raised)."""
    with lock.try_acquire():
        return "acquired"


def _pool_increment(lock: PackLock, counter: Path) -> int:
    with lock:
        assert holder_record(lock.path)["pid"] == os.getpid()
        counter.write_text(str(int(counter.read_text()) + 1))
    return os.getpid()


@pytest.mark.parametrize("method", START_METHODS)
def test_pool_workers_use_pack_locks_passed_in(pack: Path, method: str) -> None:
    lock = PackLock(pack)
    counter = pack / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        with lock:
            # Under fork the workers start here, while this process holds the lock.
            futures = [pool.submit(_pool_try, lock) for _ in range(4)]
            for future in futures:
                with pytest.raises(LockBusy) as caught:
                    future.result(timeout=DEADLINE)
                assert caught.value.path == lock.path
        assert all(f.result(timeout=DEADLINE) == "acquired" for f in [pool.submit(_pool_try, lock)])
        workers = list(pool.map(_pool_increment, [lock] * 200, [counter] * 200, timeout=60))
    assert int(counter.read_text()) == 200
    assert os.getpid() not in workers
