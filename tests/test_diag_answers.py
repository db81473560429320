"""Answers that used to be wrong, each checked against what really happens.

Every explanation here is put next to the action it describes: when the
paragraph says an acquire fails, the test acquires and sees it fail; when it
says ``doctor --prune`` leaves something alone, the test runs doctor. The
holders are real processes taking real grex_locks locks (or flock(2)
directly), stopped with a real SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import CLI, DEADLINE, Holders, check_words, cli, read_line, until

from grex_locks import (
    LockBusy,
    LockIOError,
    LockTimeout,
    ManifestLock,
    PackLock,
    Scheduler,
    WorkspaceBusy,
    WorkspaceLock,
)
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import HolderState
from grex_locks._diagnostics.scan import scan

#: Take a grex lock per argv[1] on argv[2] in this process, say "ready", hold
#: it until stdin closes. Kinds: pack, workspace, read (a manifest reader),
#: write (a manifest writer), alias (a ManifestLock on any path).
GREX_HOLDER = r"""
import sys
from grex_locks import ManifestLock, PackLock, WorkspaceLock
kind, path = sys.argv[1:3]
if kind == "pack":
    hold = PackLock(path).acquire()
elif kind == "workspace":
    hold = WorkspaceLock(path).acquire()
elif kind == "read":
    hold = ManifestLock(path).read()
    hold.__enter__()
else:
    hold = ManifestLock(path).acquire()
print("ready", flush=True)
sys.stdin.read()
"""


def grex_hold(holders: Holders, kind: str, path: Path) -> subprocess.Popen[bytes]:
    """A process holding the grex lock of ``kind`` on ``path``, once it holds it."""
    proc = holders.spawn(sys.executable, "-c", GREX_HOLDER, kind, str(path))
    assert read_line(proc) == "ready"
    return proc


# -- 1. a directory means its pack lock --------------------------------------------------


def test_diagnose_of_a_pack_directory_is_its_pack_lock(tmp_path: Path, holders: Holders) -> None:
    proc = grex_hold(holders, "pack", tmp_path)
    d = diagnose(tmp_path)
    assert d.path == tmp_path / ".grex-lock"
    assert d.state is HolderState.HELD
    assert [h.pid for h in d.holders] == [proc.pid]
    check_words(d)


def test_diagnose_of_a_workspace_directory_points_at_its_other_locks(
    tmp_path: Path, holders: Holders
) -> None:
    grex_hold(holders, "workspace", tmp_path)
    d = diagnose(tmp_path)
    # The pack rule: the directory's .grex-lock, which does not exist ...
    assert d.path == tmp_path / ".grex-lock"
    assert d.state is HolderState.FREE
    # ... and the note says where the locks of this directory are.
    assert ".grex.sync.lock" in d.note
    assert f"grex-locks who {tmp_path}" in d.explain()
    assert not (tmp_path / ".grex-lock").exists()


# -- 2. who DIR: every grex lock directly in it ----------------------------------------


def test_who_workspace_reports_every_lock_in_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    sync = grex_hold(holders, "workspace", tmp_path)
    readers = [grex_hold(holders, "read", tmp_path / ".grex.lock") for _ in range(2)]
    (tmp_path / "repo.grex-backend.lock").touch()
    (tmp_path / "slot-0.lock").touch()
    (tmp_path / "custom.lock").touch()
    (tmp_path / "custom.lock.owner").write_text("")
    (tmp_path / "unrelated.txt").touch()
    status, out, err = cli(capsys, "who", str(tmp_path))
    assert (status, err) == (1, "")
    heads = sorted(line for line in out.splitlines() if not line.startswith("  "))
    assert heads == sorted(
        [
            f"{tmp_path / '.grex.lock'}: HELD",
            f"{tmp_path / '.grex.sync.lock'}: HELD",
            f"{tmp_path / 'custom.lock'}: FREE",
            f"{tmp_path / 'repo.grex-backend.lock'}: FREE",
            f"{tmp_path / 'slot-0.lock'}: FREE",
        ]
    )
    flat = " ".join(out.split())
    assert f"pid {sync.pid}" in flat
    assert all(f"pid {r.pid}" in flat for r in readers)

    # The record path means its lock.
    status, out, _ = cli(capsys, "who", f"{tmp_path / '.grex.sync.lock'}.owner")
    assert status == 1
    assert out.startswith(f"{tmp_path / '.grex.sync.lock'}: HELD")


def test_who_says_so_when_a_directory_has_no_lock(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").touch()
    status, out, _ = cli(capsys, "who", str(tmp_path))
    assert status == 0
    assert out == f"{tmp_path}: no grex lock files in this directory\n"
    status, out, err = cli(capsys, "who", str(tmp_path), "--json")
    assert (status, out.strip()) == (0, "[]")
    assert "no grex lock files" in err


def test_scheduler_slot_files_are_all_listed(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(4, slots_dir=slots)
    with scheduler.acquire(timeout=DEADLINE):
        result = scan(tmp_path)
        names = sorted(d.path.name for d in result)
        assert [n for n in names if n.startswith("slot-")] == [f"slot-{n}.lock" for n in range(4)]
        assert sorted(d.state.name for d in result if d.path.name.startswith("slot-")) == [
            "FREE",
            "FREE",
            "FREE",
            "HELD",
        ]
        assert all(d.kind == "scheduler slot" for d in result if d.path.name.startswith("slot-"))


# -- 4. a stopped holder ------------------------------------------------------------------


@pytest.fixture
def stopped_holder(tmp_path: Path, holders: Holders) -> Iterator[subprocess.Popen[bytes]]:
    proc = grex_hold(holders, "pack", tmp_path)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        until(
            lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED,
            f"pid {proc.pid} to stop",
        )
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_stopped_holder_is_explained_as_stopped(
    tmp_path: Path, stopped_holder: subprocess.Popen[bytes]
) -> None:
    pid = stopped_holder.pid
    d = diagnose(tmp_path)
    assert d.state is HolderState.HELD
    assert d.holders[0].stopped
    assert d.holders[0].ppid == os.getpid()
    assert "pytest" in d.holders[0].parent or "python" in d.holders[0].parent
    text = d.explain()
    assert "waiting is safe" not in text
    assert f"pid {pid}, is stopped" in text
    assert "a wait for the lock lasts until then" in text
    assert f"`kill -CONT {pid}`" in text
    assert f"its parent, pid {os.getpid()}" in text
    assert f"kill -CONT {pid}" in d.holder_summary()
    check_words(d)
    # And it is so: a wait does not end while the holder is stopped.
    with pytest.raises(LockTimeout) as caught:
        PackLock(tmp_path).acquire(timeout=0.2)
    assert "stopped" in str(caught.value)


# -- 5. a manifest held shared by readers ---------------------------------------------------


def test_a_writer_timing_out_against_readers_names_them_as_readers(
    tmp_path: Path, holders: Holders
) -> None:
    manifest = tmp_path / ".grex.lock"
    readers = [grex_hold(holders, "read", manifest) for _ in range(2)]
    with pytest.raises(LockTimeout) as caught, ManifestLock(manifest).write(timeout=0.2):
        pass
    message = str(caught.value)
    assert "held shared by 2 readers: " in message
    assert all(f"pid {r.pid} (" in message for r in readers)
    assert "no usable owner record" not in message
    d = diagnose(manifest)
    assert d.state is HolderState.HELD
    assert d.shared
    assert "Readers write no owner record" in d.explain()
    check_words(d)


# -- 6. a workspace sync lock never waits -----------------------------------------------------


def test_a_held_workspace_lock_says_a_second_sync_fails_at_once(
    tmp_path: Path, holders: Holders
) -> None:
    proc = grex_hold(holders, "workspace", tmp_path)
    d = diagnose(tmp_path / ".grex.sync.lock")
    assert d.state is HolderState.HELD
    assert d.kind == "workspace sync lock"
    text = d.explain()
    assert "granted the moment" not in text
    assert "fails at once (WorkspaceBusy)" in text
    assert f"while pid {proc.pid} runs this sync" in text
    check_words(d)
    # And it is so, even with a timeout to spare.
    with pytest.raises(WorkspaceBusy) as caught:
        WorkspaceLock(tmp_path).acquire(timeout=DEADLINE)
    assert f"pid {proc.pid}" in str(caught.value)


# -- 7. what sits at the lock path, and at the record path -----------------------------------


@pytest.mark.parametrize("planted", ["FIFO", "directory", "symlink"])
def test_a_non_file_at_the_lock_path_is_explained_as_acquire_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, planted: str
) -> None:
    lock = tmp_path / ".grex-lock"
    if planted == "FIFO":
        os.mkfifo(lock)
    elif planted == "directory":
        lock.mkdir()
    else:
        (tmp_path / "elsewhere").touch()
        lock.symlink_to(tmp_path / "elsewhere")
    d = diagnose(tmp_path)
    assert d.lock_file_type == planted
    assert not d.usable
    text = d.explain()
    assert "acquire succeeds" not in text
    assert "raises LockIOError" in text
    check_words(d)
    # Nobody holds it, yet nothing can lock it: never FREE, and who says there is work to do.
    assert d.state is HolderState.UNREADABLE
    assert "No process holds it; " not in text  # a sentence, not a clause with a capital
    status, out, _ = cli(capsys, "who", str(lock))
    assert status == 1
    assert "LockIOError" in " ".join(out.split())
    # What it says: the acquire fails ...
    with pytest.raises(LockIOError):
        PackLock(tmp_path).acquire(timeout=0)
    # ... and the fix it gives works.
    if planted == "directory":
        assert f"`rmdir {lock}`" in text
        lock.rmdir()
    else:
        assert f"`mv {lock} {lock}.moved`" in text
        lock.rename(f"{lock}.moved")
    with PackLock(tmp_path).acquire(timeout=0):
        assert diagnose(tmp_path).state is HolderState.HELD


def test_a_device_at_the_lock_path_is_never_to_be_moved(capsys: pytest.CaptureFixture[str]) -> None:
    # Found by a trial: `who /dev/null` told the reader (root, perhaps) to
    # `mv /dev/null /dev/null.moved`. A device is the system's: the fix is
    # another path for the lock.
    d = diagnose(Path("/dev/null"))
    assert d.lock_file_type == "device"
    assert d.state is HolderState.UNREADABLE
    text = " ".join(d.explain().split())
    assert "mv " not in text
    assert "leave the device alone" in text
    check_words(d)
    status, out, _ = cli(capsys, "who", "/dev/null")
    assert status == 1
    assert "mv " not in out


def test_a_directory_at_the_record_path_is_explained_as_acquire_and_doctor_behave(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    lock = tmp_path / ".grex-lock"
    lock.touch()
    record = tmp_path / ".grex-lock.owner"
    record.mkdir()
    free = diagnose(tmp_path)
    assert free.state is HolderState.STALE_RECORD
    assert free.record_file_type == "directory"
    text = free.explain()
    assert "an acquire still takes the lock" in text
    assert "doctor --prune` leaves it alone" in text
    assert f"`rmdir {record}`" in text
    check_words(free)
    # doctor --prune keeps it, and says what to do by hand.
    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert status == 0
    assert "removed" not in out
    assert f"rmdir {record}" in out
    assert record.is_dir()
    # An acquire takes the lock (without a record): the holder shows as unknown, and why.
    proc = grex_hold(holders, "pack", tmp_path)
    held = diagnose(tmp_path)
    assert held.state is HolderState.UNKNOWN_HOLDER
    assert [h.pid for h in held.holders] == [proc.pid]
    assert f"owner record path {record} is a directory, so holders cannot record" in (
        held.explain()
    )
    check_words(held)
    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert f"blocked: {record}" in out
    assert record.is_dir()
    holders.kill(proc)
    # The advice works: with the directory gone, the next holder records itself.
    record.rmdir()
    proc = grex_hold(holders, "pack", tmp_path)
    assert diagnose(lock).state is HolderState.HELD


def test_a_directory_at_the_record_path_of_a_lock_not_yet_created_is_mentioned(
    tmp_path: Path,
) -> None:
    record = tmp_path / ".grex-lock.owner"
    record.mkdir()
    d = diagnose(tmp_path)
    assert d.state is HolderState.FREE
    assert d.record_file_type == "directory"
    assert f"`rmdir {record}`" in d.explain()
    check_words(d)
    # As it says: the lock is taken all the same.
    with PackLock(tmp_path).acquire(timeout=0):
        assert diagnose(tmp_path).state is HolderState.UNKNOWN_HOLDER


@pytest.mark.parametrize("planted", ["symlink", "FIFO"])
def test_a_symlink_or_fifo_at_the_record_path_is_replaced_by_the_next_holder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders, planted: str
) -> None:
    (tmp_path / ".grex-lock").touch()
    record = tmp_path / ".grex-lock.owner"
    target = tmp_path / "target.txt"
    target.write_text("not a record\n")
    if planted == "symlink":
        record.symlink_to(target)
    else:
        os.mkfifo(record)
    free = diagnose(tmp_path)
    assert free.state is HolderState.STALE_RECORD
    assert free.record_file_type == planted
    text = free.explain()
    assert "the next holder replaces it with its own record" in text
    assert "doctor --prune` leaves it alone" in text
    assert f"`rm {record}`" in text
    check_words(free)
    # doctor keeps it ...
    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert status == 0
    assert "removed" not in out
    assert (
        f"kept: doctor removes only regular-file records; remove it by hand with `rm {record}`"
        in out
    )
    assert os.path.lexists(record)
    # ... and the next holder replaces it (never writing through a symlink).
    proc = grex_hold(holders, "pack", tmp_path)
    held = diagnose(tmp_path)
    assert held.state is HolderState.HELD
    assert [h.pid for h in held.holders] == [proc.pid]
    assert not record.is_symlink()
    assert target.read_text() == "not a record\n"


# -- 8. a record beside another name (hard link) of the lock file ------------------------------


def test_a_record_beside_a_hard_link_is_found_from_the_other_name(
    tmp_path: Path, holders: Holders
) -> None:
    original = tmp_path / "state.lock"
    original.touch()
    alias = tmp_path / "alias.lock"
    os.link(original, alias)
    proc = grex_hold(holders, "write", alias)  # records itself at alias.lock.owner
    assert not Path(f"{original}.owner").exists()
    d = diagnose(original)
    assert d.state is HolderState.HELD
    assert [h.pid for h in d.holders] == [proc.pid]
    assert d.record_at == Path(f"{alias}.owner")
    assert "another name of the same file (a hard link)" in d.explain()
    check_words(d)
    # A name in another directory: the holder's open descriptor (/proc) says
    # which name it took the lock by, so the record is found there too; and
    # so does the error of an acquire through that name.
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    os.link(original, elsewhere / "state.lock")
    far = diagnose(elsewhere / "state.lock")
    assert far.state is HolderState.HELD
    assert far.record_at == Path(f"{alias}.owner")
    with pytest.raises(LockBusy) as caught:
        ManifestLock(elsewhere / "state.lock").try_acquire()
    assert caught.value.holder is not None
    assert caught.value.holder.state is HolderState.HELD
    assert "no usable owner record" not in str(caught.value)


# -- the holder is the asking process's own parent -----------------------------------------------

#: Under `grex-locks run PACK`: try to take PACK's lock again, print the error.
SAME_LOCK = r"""
import sys
from grex_locks import LockTimeout, PackLock
try:
    PackLock(sys.argv[1]).acquire(timeout=0.2)
except LockTimeout as exc:
    print(exc, flush=True)
    print(exc.holder.explain() if exc.holder is not None else "-", flush=True)
"""


def test_a_command_under_run_taking_the_same_lock_is_told_its_parent_holds_it(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [*CLI, "run", str(tmp_path), "--", sys.executable, "-c", SAME_LOCK, str(tmp_path)],
        capture_output=True,
        timeout=DEADLINE * 3,
        check=False,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    message, explained = run.stdout.strip().splitlines()
    assert message.startswith("timed out after ")
    # Named by pid, not "this process": an error's message may be read elsewhere.
    assert "— the parent of pid " in message, message
    assert ", which asked" in message, message
    parent_pid = int(message.split("held by pid ", 1)[1].split()[0])
    assert parent_pid != os.getpid()
    assert "waiting is safe" not in explained
    assert "need not take it again" in explained


#: Under `grex-locks run PACK`: wait for PACK's lock with logging on; when the
#: slow-wait line is logged, print it and give up (the cancel event).
SLOW_WAIT = r"""
import sys, threading
from loguru import logger
from grex_locks import LockCancelled, PackLock
given_up = threading.Event()
def sink(message):
    if "still waiting" in message:
        print(message.record["message"], flush=True)
        given_up.set()
logger.remove()
logger.add(sink, level="WARNING")
logger.enable("grex_locks")
try:
    PackLock(sys.argv[1]).acquire(timeout=60, cancel=given_up)
except LockCancelled:
    pass
"""


@pytest.mark.slow
def test_the_slow_wait_line_of_a_command_under_run_names_its_parent(tmp_path: Path) -> None:
    """The log line a wait prints after a few seconds says the holder is the waiter's parent."""
    run = subprocess.run(
        [*CLI, "run", str(tmp_path), "--", sys.executable, "-c", SLOW_WAIT, str(tmp_path)],
        capture_output=True,
        timeout=90,
        check=False,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert line.startswith("still waiting after "), line
    assert "— the parent of pid " in line, line
