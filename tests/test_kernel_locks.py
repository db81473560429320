"""The kernel lock table parser (property-tested) and the live /proc lookups."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import DEADLINE, wait_until_blocked

from grex_locks._diagnostics.kernel_lock_table import (
    KernelLock,
    KernelLockTable,
    ProcessFiles,
    parse_line,
)

needs_proc_locks = pytest.mark.skipif(
    not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks"
)


# -- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF",
            KernelLock("FLOCK", "WRITE", 1234, (os.makedev(0xFD, 1), 5678)),
        ),
        (
            "1: -> FLOCK  ADVISORY  WRITE 4321 fd:01:5678 0 EOF",
            KernelLock("FLOCK", "WRITE", 4321, (os.makedev(0xFD, 1), 5678), waiting=True),
        ),
        (  # deeper waiters are indented before the arrow
            "7:  -> POSIX  ADVISORY  READ 99 08:02:12 100 199",
            KernelLock("POSIX", "READ", 99, (os.makedev(8, 2), 12), waiting=True),
        ),
        (
            "3: OFDLCK ADVISORY  READ  -1 00:2d:4242 0 EOF",
            KernelLock("OFDLCK", "READ", -1, (os.makedev(0, 0x2D), 4242)),
        ),
        (
            "12: LEASE  ACTIVE    READ 77 103:05:18446744073709551615 0 EOF",
            KernelLock("LEASE", "READ", 77, (os.makedev(0x103, 5), 2**64 - 1)),
        ),
        (
            "lock:\t1: FLOCK  ADVISORY  WRITE 5 fe:00:9 0 EOF"[5:],
            KernelLock("FLOCK", "WRITE", 5, (os.makedev(0xFE, 0), 9)),
        ),
    ],
)
def test_parse_known_lines(line: str, expected: KernelLock) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "1: FLOCK  ADVISORY  WRITE 1234 <none>:0 0 EOF",
        "1: FLOCK  ADVISORY  WRITE abc fd:01:5678 0 EOF",
        "1: FLOCK  ADVISORY  WRITE 1234 fd:01:-5 0 EOF",
        "1: FLOCK  ADVISORY  WRITE 1234 zz:01:5678 0 EOF",
        "1: FLOCK  ADVISORY  WRITE 1234 fffffffff:01:5678 0 EOF",
        "x: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF",
        "1: FLOCK  ADVISORY  WRITE 1234 fd:01:" + "9" * 5000,
    ],
)
def test_parse_rejects_malformed_lines(line: str) -> None:
    assert parse_line(line) is None


@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    result = parse_line(text)
    assert result is None or isinstance(result, KernelLock)
    KernelLockTable.parse(text)


@given(st.binary())
def test_table_never_raises_on_any_bytes(data: bytes) -> None:
    table = KernelLockTable.parse(data.decode("ascii", "replace"))
    assert table.available
    for lock in table.locks:
        assert table.holders(lock.key, kind=None) or table.waiters(lock.key, kind=None)


@given(
    st.tuples(
        st.sampled_from(["FLOCK", "POSIX", "OFDLCK"]),
        st.sampled_from(["READ", "WRITE"]),
        st.integers(-1, 2**22),
        st.integers(0, 0xFFF),
        st.integers(0, 0xFFFFF),
        st.integers(0, 2**64 - 1),
        st.booleans(),
        st.integers(1, 10**6),
    )
)
def test_parse_roundtrips_generated_lines(
    fields: tuple[str, str, int, int, int, int, bool, int],
) -> None:
    kind, mode, pid, major, minor, ino, waiting, lock_id = fields
    arrow = "-> " if waiting else ""
    line = f"{lock_id}: {arrow}{kind}  ADVISORY  {mode} {pid} {major:02x}:{minor:02x}:{ino} 0 EOF"
    assert parse_line(line) == KernelLock(kind, mode, pid, (os.makedev(major, minor), ino), waiting)


def test_table_groups_holders_and_waiters_by_file() -> None:
    text = "\n".join(
        [
            "1: FLOCK  ADVISORY  WRITE 10 fd:01:5 0 EOF",
            "1: -> FLOCK  ADVISORY  WRITE 11 fd:01:5 0 EOF",
            "1: -> FLOCK  ADVISORY  WRITE 12 fd:01:5 0 EOF",
            "2: POSIX  ADVISORY  READ 13 fd:01:5 0 EOF",
            "3: FLOCK  ADVISORY  READ 14 fd:01:6 0 EOF",
            "not a lock line",
        ]
    )
    table = KernelLockTable.parse(text)
    key = (os.makedev(0xFD, 1), 5)
    assert [lock.pid for lock in table.holders(key)] == [10]
    assert [lock.pid for lock in table.holders(key, kind=None)] == [10, 13]
    assert [lock.pid for lock in table.waiters(key)] == [11, 12]
    assert table.holders((os.makedev(0xFD, 1), 7)) == []
    assert len(table) == 5


def test_missing_table_is_unavailable_and_says_why(tmp_path: Path) -> None:
    table = KernelLockTable.read(str(tmp_path / "locks"))
    assert not table.available
    assert "locks" in table.reason
    assert table.holders((1, 2)) == []
    assert table.waiters((1, 2)) == []
    unreadable = KernelLockTable.read(str(tmp_path))  # a directory: EISDIR
    assert not unreadable.available
    assert unreadable.reason


# -- the live kernel ----------------------------------------------------------------


@pytest.fixture
def lock_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "f.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    yield fd
    os.close(fd)


def _key(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino)


@needs_proc_locks
@pytest.mark.parametrize(("op", "mode"), [(fcntl.LOCK_EX, "WRITE"), (fcntl.LOCK_SH, "READ")])
def test_live_flock_is_matched_to_the_file(lock_fd: int, op: int, mode: str) -> None:
    assert KernelLockTable.read().holders(_key(lock_fd)) == []
    fcntl.flock(lock_fd, op)
    (lock,) = KernelLockTable.read().holders(_key(lock_fd))
    assert (lock.kind, lock.mode, lock.pid, lock.waiting) == ("FLOCK", mode, os.getpid(), False)
    fcntl.flock(lock_fd, fcntl.LOCK_UN)
    assert KernelLockTable.read().holders(_key(lock_fd)) == []


@needs_proc_locks
@pytest.mark.parametrize(("op", "mode"), [(fcntl.LOCK_EX, "WRITE"), (fcntl.LOCK_SH, "READ")])
def test_process_files_tell_how_a_process_holds_its_flock(
    lock_fd: int, tmp_path: Path, op: int, mode: str
) -> None:
    """``lock_mode`` reads a holder's own fdinfo: how it holds the lock, without /proc/locks."""
    files = ProcessFiles()
    assert files.lock_mode(os.getpid(), _key(lock_fd)) is None
    fcntl.flock(lock_fd, op)
    assert ProcessFiles().lock_mode(os.getpid(), _key(lock_fd)) == mode
    other = os.open(tmp_path / "other.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        assert ProcessFiles().lock_mode(os.getpid(), _key(other)) is None
    finally:
        os.close(other)
    assert ProcessFiles().lock_mode(2**40, _key(lock_fd)) is None


@needs_proc_locks
def test_posix_locks_are_listed_but_are_not_flocks(lock_fd: int, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f.lock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        table = KernelLockTable.read()
        assert table.holders(_key(fd)) == []
        assert [lock.kind for lock in table.holders(_key(fd), kind=None)] == ["POSIX"]
    finally:
        os.close(fd)


@needs_proc_locks
def test_waiter_is_listed_and_process_files_tell_holder_from_waiter(
    lock_fd: int, tmp_path: Path
) -> None:
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    path = tmp_path / "f.lock"
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX)"
    )
    waiter = subprocess.Popen([sys.executable, "-c", code, str(path)])
    try:
        wait_until_blocked(path, waiter.pid)
        table = KernelLockTable.read()
        assert [lock.pid for lock in table.waiters(_key(lock_fd))] == [waiter.pid]
        files = ProcessFiles()
        assert files.holds(os.getpid(), _key(lock_fd)) is True
        # The waiter has the file open, but its descriptor holds no lock.
        assert files.holds(waiter.pid, _key(lock_fd)) in (False, None)
        openers = {o.pid: o for o in files.openers(_key(lock_fd))}
        assert openers[os.getpid()].locked is True
        assert openers[waiter.pid].locked is not True
        holders = files.holders(_key(lock_fd), [os.getpid()], [waiter.pid])
        assert holders == [os.getpid()]
    finally:
        waiter.kill()
        waiter.wait(DEADLINE)


@needs_proc_locks
def test_real_holders_found_when_the_taker_is_gone(lock_fd: int, tmp_path: Path) -> None:
    """A child takes the lock, hands it to a grandchild and exits: the grandchild holds it."""
    read_end, write_end = os.pipe()
    stdin_read, stdin_write = os.pipe()  # the grandchild lives until this closes
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            # A description of its own: the test's lock_fd must not share the lock.
            own = os.open(tmp_path / "f.lock", os.O_RDONLY)
            fcntl.flock(own, fcntl.LOCK_EX)
            heir = subprocess.Popen(
                [sys.executable, "-c", "import sys; sys.stdin.read()"],
                pass_fds=(own,),
                stdin=stdin_read,
            )
            os.write(write_end, f"{heir.pid}\n".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(stdin_read)
    with os.fdopen(read_end) as reader:
        grandchild = int(reader.readline())
    try:
        os.waitpid(pid, 0)
        (lock,) = KernelLockTable.read().holders(_key(lock_fd))
        assert lock.pid in (pid, 0)  # the taker, dead (0 outside the initial pid namespace)
        files = ProcessFiles()
        assert files.holders(_key(lock_fd), [lock.pid], []) == [grandchild]
    finally:
        os.close(stdin_write)
        os.kill(grandchild, 9)


def test_process_files_never_raise_on_odd_pids() -> None:
    files = ProcessFiles()
    for pid in (0, -5, 2**40, 1):
        assert files.holds(pid, (1, 2)) in (False, None)
    assert files.fd_locked(2**40, 0) is None
    assert ProcessFiles(proc="/nonexistent").openers((1, 2)) == []
