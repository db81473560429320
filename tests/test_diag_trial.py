"""What a new-user trial found wrong in diagnostics, checked from outside.

Real holders (util-linux ``flock(1)``, library holders in other processes,
another user through ``setpriv``), real signals; the kernel's lock table is
hidden by a bind mount where root may make one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import CLI, DEADLINE, Holders, check_words, read_line, until

from grex_locks import LockBusy, PackLock
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import HolderState
from grex_locks._diagnostics.probe import Probe
from grex_locks._diagnostics.process_tree import proc_stat

FLOCK = shutil.which("flock")
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")
needs_flock = pytest.mark.skipif(FLOCK is None, reason="needs util-linux flock(1)")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv(1)"
)
NOBODY = [str(SETPRIV), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
DAEMON = [str(SETPRIV), "--reuid=daemon", "--regid=daemon", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter and write in (mode 1777, like /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="grex-trial-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def flock_holder(holders: Holders, lock: Path, command: str) -> subprocess.Popen[bytes]:
    """``flock LOCK -c COMMAND``, once its command runs (it prints "ready" first)."""
    proc = holders.spawn(str(FLOCK), str(lock), "-c", f"echo ready; {command}")
    assert read_line(proc) == "ready"
    return proc


def children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


# -- 1. a kernel table that cannot be read --------------------------------------------------


@needs_flock
@needs_root
@pytest.mark.skipif(UNSHARE is None, reason="needs unshare(1)")
def test_who_with_proc_locks_hidden_is_not_free(shared_dir: Path, holders: Holders) -> None:
    pack = shared_dir / "pack"
    pack.mkdir(mode=0o755)
    lock = pack / ".grex-lock"
    lock.touch()
    flock_holder(holders, lock, "exec cat")
    closed = shared_dir / "closed"
    closed.touch(mode=0o000)
    script = f"mount --bind {shlex.quote(str(closed))} /proc/locks && exec " + shlex.join(
        [*NOBODY, *CLI, "who", "--json", str(pack)]
    )
    run = subprocess.run(
        [str(UNSHARE), "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=False,
    )
    if "mount" in run.stderr and run.returncode != 1:
        pytest.skip(f"cannot bind-mount over /proc/locks here: {run.stderr.strip()}")
    assert run.returncode == 1, run.stderr
    (found,) = json.loads(run.stdout)
    assert found["state"] == "UNREADABLE"
    assert not found["kernel_visible"]
    assert "/proc/locks" in found["note"]
    assert "cannot be seen" in found["note"]


# -- 2. another user's holder, its descriptors closed to us -------------------------------


@needs_root
def test_another_users_holder_is_named_in_a_timeout(shared_dir: Path, holders: Holders) -> None:
    lock = shared_dir / ".grex.lock"
    holder = holders.hold_with_library("ManifestLock", lock, as_user=NOBODY)
    probe = (
        "import sys, grex_locks\n"
        "try:\n"
        "    grex_locks.ManifestLock(sys.argv[1]).acquire(timeout=0.2)\n"
        "except grex_locks.LockTimeout as e:\n"
        "    print(e.holder.state.name); print([h.pid for h in e.holder.holders]); print(e)\n"
    )
    run = subprocess.run(
        [*DAEMON, sys.executable, "-c", probe, str(lock)],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=False,
    )
    state, pids, message = run.stdout.splitlines()[:3]
    assert state == "HELD", run.stdout + run.stderr
    assert pids == f"[{holder.pid}]"
    assert f"held by pid {holder.pid}" in message
    assert "cannot be identified" not in message
    assert "not by pid" not in message


# -- 3. a record's exact start --------------------------------------------------------------


@needs_flock
def test_record_start_ticks_tell_a_pid_reused_within_the_second(
    tmp_path: Path, holders: Holders
) -> None:
    lock = tmp_path / ".grex-lock"
    holder = flock_holder(holders, lock, "exec cat")
    taker = psutil.Process(holder.pid)
    ticks = proc_stat(holder.pid)
    assert ticks is not None
    record = {"pid": holder.pid, "create_time": taker.create_time(), "hostname": os.uname()[1]}
    owner = Path(f"{lock}.owner")
    # The record of an earlier process with this pid, started a tick apart:
    # create_time cannot tell them apart, the ticks can.
    owner.write_text(json.dumps({**record, "start_ticks": ticks.start_ticks - 1}))
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert "another process" in d.note
    check_words(d)
    # The same record with the live process's ticks: it is that process.
    owner.write_text(json.dumps({**record, "start_ticks": ticks.start_ticks}))
    assert diagnose(lock).state is HolderState.HELD
    # A record without ticks (an older writer's) is judged by create_time alone.
    owner.write_text(json.dumps(record))
    assert diagnose(lock).state is HolderState.HELD


def test_identity_compares_start_ticks_exactly() -> None:
    me = psutil.Process()
    ticks = proc_stat(os.getpid())
    assert ticks is not None
    probe = Probe()
    assert probe.identity(me.pid, me.create_time(), ticks.start_ticks) == "alive"
    assert probe.identity(me.pid, me.create_time(), ticks.start_ticks + 1) == "reused"
    assert probe.identity(me.pid, me.create_time()) == "alive"
    assert probe.identity(me.pid, me.create_time() - 100, ticks.start_ticks) == "reused"


# -- 4. commands a person pastes --------------------------------------------------------------


def test_suggested_commands_quote_paths_and_work(tmp_path: Path) -> None:
    pack = tmp_path / "a b$(echo x)"
    pack.mkdir()
    lock = pack / ".grex-lock"
    os.mkfifo(lock)
    text = diagnose(pack).explain()
    (command,) = re.findall(r"`(mv [^`]*)`", text)
    assert shlex.split(command) == ["mv", str(lock), f"{lock}.moved"]
    subprocess.run(["sh", "-c", command], check=True, timeout=DEADLINE)
    assert not os.path.lexists(lock)
    with PackLock(pack).acquire(timeout=0):
        pass


@needs_flock
def test_a_holders_command_is_shown_as_a_shell_would_read_it(
    tmp_path: Path, holders: Holders, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a short command line: the whole of it is shown
    holder = flock_holder(holders, Path("L"), "exec cat")
    d = diagnose(tmp_path / "L")
    found = d.holder(holder.pid)
    assert found is not None
    assert found.command() == "flock L -c 'echo ready; exec cat'"
    assert shlex.split(found.command()) == ["flock", "L", "-c", "echo ready; exec cat"]


# -- 5. every process that shares the locked descriptor ------------------------------------


@needs_flock
def test_holders_include_the_takers_children(tmp_path: Path, holders: Holders) -> None:
    lock = tmp_path / ".grex-lock"
    holder = flock_holder(holders, lock, "cat; true")  # sh -c stays, cat its child
    until(lambda: len(children(holder.pid)) == 2, "sh -c and its cat to start")
    family = [holder.pid, *children(holder.pid)]
    d = diagnose(lock)
    assert sorted(h.pid for h in d.holders) == sorted(family)
    assert d.holders[0].pid == holder.pid  # the taker first
    with pytest.raises(LockBusy) as caught:
        PackLock(tmp_path).try_acquire()
    assert caught.value.holder is not None
    assert sorted(h.pid for h in caught.value.holder.holders) == sorted(family)


def test_holders_include_the_parent_that_opened_it(tmp_path: Path, holders: Holders) -> None:
    # As a shell's `exec 9>lock; flock 9 ...`: the parent opens the file, a
    # child locks the descriptor it inherited, and both hold the lock.
    lock = tmp_path / ".grex-lock"
    code = (
        "import os, subprocess, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "take = 'import fcntl, sys; fcntl.flock(int(sys.argv[1]), fcntl.LOCK_EX); "
        'print("locked", flush=True); sys.stdin.read()\'\n'
        "taker = subprocess.Popen([sys.executable, '-c', take, str(fd)], pass_fds=(fd,), "
        "stdout=subprocess.PIPE)\n"
        "print(taker.pid, taker.stdout.readline().decode().strip(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = holders.spawn(sys.executable, "-c", code, str(lock))
    taker_pid, word = read_line(parent).split()
    assert word == "locked"
    d = diagnose(lock)
    assert [h.pid for h in d.holders] == [int(taker_pid), parent.pid]
    assert d.lock_pids == (int(taker_pid),)


# -- 7. a lock changing hands fast ------------------------------------------------------------


@pytest.mark.slow
def test_churn_never_gives_a_self_contradicting_summary(tmp_path: Path) -> None:
    code = (
        "import sys; from grex_locks import PackLock\n"
        "lock = PackLock(sys.argv[1]); print('go', flush=True)\n"
        "while not sys.stdin.closed:\n"
        "    with lock: pass\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert read_line(proc) == "go"
        states: dict[str, int] = {}
        for _ in range(300):
            d = diagnose(tmp_path)
            states[d.state.name] = states.get(d.state.name, 0) + 1
            summary = d.holder_summary()
            for pid in re.findall(r"held by pid (\d+)", summary):
                assert f"not by pid {pid} " not in summary, summary
                assert f"inherited from pid {pid}," not in summary, summary
    finally:
        proc.kill()
        proc.wait(DEADLINE)
    # A holder between holds is a moment's state: never ORPHANED, and only
    # sometimes UNKNOWN_HOLDER (~1 % on a quiet machine, up to ~10 % under
    # load). The bound only catches a verdict gone wholly wrong.
    assert states.get("ORPHANED", 0) == 0, states
    assert states.get("UNKNOWN_HOLDER", 0) < 150, states


def test_a_record_emptied_by_hand_under_a_live_holder_is_unknown_holder(
    tmp_path: Path, holders: Holders
) -> None:
    # The state table: held, with no record, is UNKNOWN_HOLDER, even when the
    # holder is a grex_locks process that keeps its record file open; only a
    # holder caught between its own writes at every look reads as HELD.
    proc = holders.hold_with_library("PackLock", tmp_path)
    assert diagnose(tmp_path).state is HolderState.HELD
    record = tmp_path / ".grex-lock.owner"
    with open(record, "r+b") as in_place:
        in_place.write(b" " * record.stat().st_size)
    d = diagnose(tmp_path)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert d.owner is None
    assert [h.pid for h in d.holders] == [proc.pid]


# -- 10. words and JSON ------------------------------------------------------------------------


def test_a_stopped_holder_is_told_to_continue_once(tmp_path: Path, holders: Holders) -> None:
    proc = holders.hold(tmp_path / ".grex-lock")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        psutil_status = psutil.Process(proc.pid)
        for _ in range(1000):
            if psutil_status.status() == psutil.STATUS_STOPPED:
                break
            os.sched_yield()
        d = diagnose(tmp_path)
        assert d.holders[0].stopped
        assert d.explain().count(f"kill -CONT {proc.pid}") == 1
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_to_dict_is_strict_json_for_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    pack = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    with PackLock(pack):
        data = diagnose(pack).to_dict()
    text = json.dumps(data, ensure_ascii=False)
    text.encode("utf-8")  # a lone surrogate would raise here, as strict parsers refuse it
    assert data["path"].endswith("caf\\xe9/.grex-lock")
    assert data["state"] == "HELD"
