"""Ownership seen from outside: a lock is held exactly while its holder says so.

Each test reproduces one way the first release broke that promise (a forked
child releasing or wiping what its parent holds; the garbage collector
releasing a lock nobody referenced; a record path that locked everyone out)
and judges the outcome the way another program would: a third process tries
the lock with util-linux ``flock -n``, and the record's bytes are read from
the file.
"""

from __future__ import annotations

import gc
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from support import (
    DEADLINE,
    FLOCK,
    owner_record,
    third_process_can_take,
    wait_for_exit,
)

import grex_locks
from grex_locks import Hold, HolderState, ManifestLock, PackLock, WorkspaceLock

pytestmark = pytest.mark.skipif(FLOCK is None, reason="needs util-linux flock(1)")


def read_line(fd: int) -> str:
    """One line from pipe ``fd``, within the deadline."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no answer within {DEADLINE} s (so far {data!r})"
        chunk = os.read(fd, 1)
        assert chunk, f"the other end closed the pipe after {data!r}"
        data += chunk
    return data.decode().strip()


def end_child(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child, then end it as an exiting interpreter would.

    ``sys.exit`` and exceptions unwind through the child's frames (leaving any
    ``with`` block entered before the fork), what the child dropped is
    collected, and the exit status is Python's: 0, the ``sys.exit`` code, or 1
    for an uncaught exception. (``os._exit`` at the end keeps the child out of
    the test runner's own frames.)
    """
    code = 0
    try:
        body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001 - an uncaught error ends the child with status 1
        code = 1
    gc.collect()
    os._exit(code)


def _reraise(exc: BaseException) -> None:
    raise exc


def fork_child(body: Callable[[int, int], None]) -> tuple[int, int, int]:
    """Fork a child running ``body(to_parent, from_parent)``, ended by :func:`end_child`."""
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(up_r)
        os.close(down_w)
        end_child(lambda: body(up_w, down_r))
    os.close(up_w)
    os.close(down_r)
    return pid, up_r, down_w


def test_forked_child_dropping_an_inherited_hold_does_not_unlock_its_own_lock(
    tmp_path: Path,
) -> None:
    """Issue: the child's new lock reused the inherited descriptor number, and dropping
    the inherited hold unlocked it (and emptied the parent's record)."""
    a = PackLock(tmp_path / "a")
    held = a.acquire()
    parent_record = owner_record(a.path)

    def child(up: int, down: int) -> None:
        nonlocal held
        b = PackLock(tmp_path / "b")
        b_hold = b.acquire()
        del held
        gc.collect()
        os.write(up, b"inside b\n")
        read_line(down)
        b_hold.release()

    pid, up, down = fork_child(child)
    try:
        assert read_line(up) == "inside b"
        assert not third_process_can_take(tmp_path / "b" / ".grex-lock"), "b was unlocked"
        assert not third_process_can_take(a.path), "the parent's lock was unlocked"
        assert owner_record(a.path) == parent_record
    finally:
        os.write(down, b"go\n")
    assert wait_for_exit(pid) == 0
    assert owner_record(a.path) == parent_record
    assert not third_process_can_take(a.path)
    held.release()
    assert third_process_can_take(a.path)
    assert owner_record(a.path) is None


@pytest.mark.parametrize("how", ["with lock", "with lock.acquire()"])
@pytest.mark.parametrize("ending", ["sys.exit(0)", "return", "raise", "release, then return"])
def test_child_leaving_a_with_block_entered_before_the_fork_touches_nothing(
    tmp_path: Path, how: str, ending: str
) -> None:
    """Issue: the child's exit from its parent's ``with`` raised and wiped the record."""
    lock = PackLock(tmp_path / "pack")
    parent = os.getpid()

    def inside(hold: Hold | None) -> None:
        pid = os.fork()
        if pid == 0:  # the child leaves the with block below, as the parent will
            if ending == "release, then return":
                if hold is not None:
                    hold.release()  # an inherited hold: nothing, however often
                    hold.release()
                else:
                    with pytest.raises(RuntimeError):
                        lock.release()  # the lock object holds nothing here
            if ending == "sys.exit(0)":
                sys.exit(0)
            if ending == "raise":
                raise RuntimeError("the child's own error")
            return
        status = wait_for_exit(pid)
        assert status == (1 if ending == "raise" else 0)
        assert not third_process_can_take(lock.path)
        record = owner_record(lock.path)
        assert record is not None
        assert record["pid"] == parent

    def body() -> None:
        if how == "with lock":
            with lock:
                inside(None)
        else:
            with lock.acquire() as hold:
                inside(hold)

    end_child_if_forked = parent  # after body(), the child (only) ends here, as Python would
    try:
        body()
    except BaseException as exc:
        if os.getpid() != end_child_if_forked:  # pragma: no cover - the child
            error = exc
            end_child(lambda: _reraise(error))
        raise
    if os.getpid() != end_child_if_forked:  # pragma: no cover - the child
        end_child(lambda: None)
    assert third_process_can_take(lock.path)
    assert owner_record(lock.path) is None


def test_explicit_release_of_an_inherited_lock_object_is_a_runtime_error(tmp_path: Path) -> None:
    lock = PackLock(tmp_path / "pack")
    with lock:

        def child(up: int, down: int) -> None:
            del down
            assert not lock.held
            try:
                lock.release()
            except RuntimeError:
                os.write(up, b"RuntimeError\n")
            else:
                os.write(up, b"released\n")

        pid, up, _down = fork_child(child)
        assert read_line(up) == "RuntimeError"
        assert wait_for_exit(pid) == 0
        assert not third_process_can_take(lock.path)
        assert owner_record(lock.path) is not None


def _collect_garbage(_task: int) -> int:
    gc.collect()
    return os.getpid()


def test_fork_pool_under_held_locks_leaves_the_parents_records_and_locks(tmp_path: Path) -> None:
    """Issue: a ``fork`` pool started under a held lock wiped the parent's owner records."""
    workspace = tmp_path / "ws"
    with WorkspaceLock(workspace) as ws, PackLock(workspace / "pack") as pack:
        before = {lock.path: owner_record(lock.path) for lock in (ws, pack)}
        with ProcessPoolExecutor(4, mp_context=get_context("fork")) as pool:
            pids = set(pool.map(_collect_garbage, range(16)))
        assert os.getpid() not in pids
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=gc.collect, check=True)
        for lock in (ws, pack):
            assert owner_record(lock.path) == before[lock.path]
            assert not third_process_can_take(lock.path)
            diagnosis = grex_locks.diagnose(lock.path)
            assert diagnosis.state is HolderState.HELD, diagnosis.explain()
            assert diagnosis.owner is not None
            assert diagnosis.owner["pid"] == os.getpid()
    assert third_process_can_take(workspace / ".grex.sync.lock")


def _take_and_forget(pack: Path) -> None:
    PackLock(pack).acquire()


def test_a_lock_nobody_references_stays_held_until_released_or_exit(tmp_path: Path) -> None:
    """Issue: the garbage collector released such a lock at some later collection.

    The forgetful holder is a child process, so that its exit is what frees it.
    """
    lock_file = tmp_path / "pack" / ".grex-lock"

    def child(up: int, down: int) -> None:
        _take_and_forget(tmp_path / "pack")
        gc.collect()
        os.write(up, b"taken and forgotten\n")
        read_line(down)

    pid, up, down = fork_child(child)
    try:
        assert read_line(up) == "taken and forgotten"
        assert not third_process_can_take(lock_file)
        record = owner_record(lock_file)
        assert record is not None
        assert record["pid"] == pid
    finally:
        os.write(down, b"exit\n")
    assert wait_for_exit(pid) == 0
    assert third_process_can_take(lock_file)


def test_unheld_lock_objects_close_their_descriptors_when_collected(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for n in range(200):
        lock = PackLock(tmp_path / f"p{n}")
        with lock:
            pass
        del lock
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1


@pytest.mark.parametrize("planted", ["directory", "symlink", "fifo"])
def test_a_record_path_that_cannot_hold_a_record_never_stops_the_lock(
    tmp_path: Path, planted: str
) -> None:
    """Issue: a directory at ``<lock>.owner`` made every exclusive acquire fail."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    manifest = ManifestLock(tmp_path / "m.lock")
    record = Path(str(manifest.path) + grex_locks.OWNER_SUFFIX)
    if planted == "directory":
        record.mkdir()
    elif planted == "symlink":
        record.symlink_to(outside)
    else:
        os.mkfifo(record)
    with manifest.write():
        assert not third_process_can_take(manifest.path)
    assert third_process_can_take(manifest.path)
    assert outside.read_bytes() == b"precious"
    if planted == "directory":
        assert record.is_dir()


PROTECTED_REGULAR = Path("/proc/sys/fs/protected_regular")


@pytest.fixture
def protected_regular() -> Iterator[None]:
    """``fs.protected_regular=1`` (many distributions' default) for the test's duration."""
    if os.geteuid() != 0 or not os.access(PROTECTED_REGULAR, os.W_OK):
        pytest.skip("needs root and a writable /proc/sys/fs/protected_regular")
    before = PROTECTED_REGULAR.read_text()
    PROTECTED_REGULAR.write_text("1")
    try:
        yield
    finally:
        PROTECTED_REGULAR.write_text(before)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv(1)")
def test_another_users_lock_file_in_a_sticky_directory_opens_under_protected_regular(
    request: pytest.FixtureRequest, protected_regular: None
) -> None:
    """An O_CREAT open of another user's file in a sticky world-writable directory
    fails with EACCES under fs.protected_regular, even for root: existing lock
    files must be opened without it, or one user locks the others out."""
    # Outside pytest's own directory, which only root may enter.
    shared = Path(tempfile.mkdtemp(prefix="grex-sticky-"))
    shared.chmod(0o1777)
    request.addfinalizer(lambda: shutil.rmtree(shared))
    take = "import sys, grex_locks\nwith grex_locks.ManifestLock(sys.argv[1]).write(): pass\n"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    lock_file = shared / "m.lock"
    subprocess.run([*as_nobody, sys.executable, "-c", take, str(lock_file)], check=True)
    assert lock_file.stat().st_uid == 65534
    with ManifestLock(lock_file).write():
        # (flock_n opens the lock file read-only: an O_CREAT open, as flock(1) does
        # with a path, is what protected_regular refuses here.)
        assert not third_process_can_take(lock_file)
        record = owner_record(lock_file)
        assert record is not None
        assert record["pid"] == os.getpid()


_HOLD_WITH_HUGE_NAMES = """
import sys, threading, grex_locks
threading.current_thread().name = "t" * 100_000
with grex_locks.PackLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_huge_command_line_leaves_a_record_that_diagnostics_can_read(tmp_path: Path) -> None:
    # Readers read at most 64 KiB of a record: a holder with a 1 MB command
    # line (and a huge thread name) must still leave one they can use.
    pack = tmp_path / "pack"
    huge = ["x" * 50_000] * 20
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WITH_HUGE_NAMES, str(pack), *huge],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        ready, _, _ = select.select([child.stdout], [], [], DEADLINE)
        assert ready
        assert child.stdout.readline() == "held\n"
        lock_file = pack / grex_locks.PACK_LOCK_FILE_NAME
        record_size = Path(f"{lock_file}{grex_locks.OWNER_SUFFIX}").stat().st_size
        assert record_size < 16 * 1024
        owner = owner_record(lock_file)
        assert owner is not None
        assert owner["pid"] == child.pid
        assert owner["argv"][:2] == ["-c", str(pack)]
        assert owner["argv"][-1].endswith("argument(s) cut short)")
        assert owner["thread"] == "t" * 256
        with open(f"/proc/{child.pid}/stat", "rb") as stat_file:
            ticks = int(stat_file.read().rpartition(b")")[2].split()[19])
        assert owner["start_ticks"] == ticks
        assert grex_locks.diagnose(lock_file).state is HolderState.HELD
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(DEADLINE) == 0
    finally:
        child.kill()
        child.wait(DEADLINE)
