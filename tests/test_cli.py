"""The grex-locks command line, and scan()/doctor underneath it.

Commands that only read run in-process through ``main()``; ``run`` and
anything about signals or logging run as real ``python -m grex_locks``
processes.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import (
    CLI,
    DEADLINE,
    Holders,
    PipedChild,
    cli,
    finish,
    read_line,
    spawn_cli,
    wait_until_blocked,
)

from grex_locks import PackLock
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import Diagnosis, Holder, HolderState
from grex_locks._diagnostics.prune import prune_stale_record
from grex_locks._diagnostics.scan import WaitCycle, find_wait_cycles, scan

#: Lock argv[1], say "ready", wait for a line, then block locking argv[2].
CROSS = r"""
import fcntl, os, sys
first, second = (os.open(p, os.O_RDONLY | os.O_CREAT) for p in sys.argv[1:3])
fcntl.flock(first, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.readline()
fcntl.flock(second, fcntl.LOCK_EX)
"""

#: Print our pid, then live until stdin closes (SIGINT at its default action).
CHILD = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "print(os.getpid(), flush=True); sys.stdin.read()"
)


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    path = tmp_path / "pack"
    path.mkdir()
    (path / ".grex-lock").touch()
    return path


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, object]]]:
    status, out, _ = cli(capsys, *args, "--json")
    data = json.loads(out)
    assert isinstance(data, list)
    return status, data


# -- who ---------------------------------------------------------------------------


def test_who_exit_codes_and_json(
    capsys: pytest.CaptureFixture[str], pack: Path, tmp_path: Path, holders: Holders
) -> None:
    status, out, err = cli(capsys, "who", str(pack))
    assert (status, err) == (0, "")
    assert f"{pack / '.grex-lock'}: FREE" in out
    status, _, err = cli(capsys, "who", str(tmp_path / "missing"))
    assert status == 2
    assert "no such file or directory" in err
    assert "Traceback" not in err

    other = tmp_path / "other"
    other.mkdir()
    proc = holders.hold(other / ".grex-lock")
    status, data = cli_json(capsys, "who", str(pack), str(other / ".grex-lock"))
    assert status == 1
    assert [d["state"] for d in data] == ["FREE", "HELD"]
    assert data[1]["holders"][0]["pid"] == proc.pid  # type: ignore[index]

    holders.kill(proc)
    status, data = cli_json(capsys, "who", str(other))
    assert status == 0
    assert data[0]["state"] == "STALE_RECORD"


def test_who_shows_waiters(
    capsys: pytest.CaptureFixture[str], pack: Path, holders: Holders
) -> None:
    lock = pack / ".grex-lock"
    proc = holders.hold(lock, record="none")
    holders.wait_for(lock)
    status, out, _ = cli(capsys, "who", str(pack))
    assert status == 1
    assert "UNKNOWN_HOLDER" in out
    assert f"1 waiting behind pid {proc.pid}" in out


# -- scan ----------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    locks = {
        "pack": root / "a" / ".grex-lock",
        "sync": root / ".grex.sync.lock",
        "manifest": root / "a" / ".grex.lock",
        "backend": root / "a" / "repo.grex-backend.lock",
        "custom": root / "b" / "deep" / "custom.lock",
    }
    for path in locks.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    Path(f"{locks['custom']}.owner").write_text("{}")
    (root / "b" / "deep" / ".custom.lock.owner.99.0.tmp").write_text("{}")
    (root / "b" / "plain.txt").touch()
    (root / "b" / ".git").mkdir()
    (root / "b" / ".git" / ".grex-lock").touch()  # inside git metadata: skipped
    (root / "loop").symlink_to(root, target_is_directory=True)
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / ".grex-lock").touch()
    (root / "link").symlink_to(outside, target_is_directory=True)
    return locks


def test_scan_finds_every_kind_and_follows_no_symlinked_dir(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    locks = _tree(root)
    result = scan(root)
    assert sorted(str(d.path) for d in result) == sorted(str(p) for p in locks.values())
    states = {d.path.name: d.state for d in result}
    assert states["custom.lock"] is HolderState.STALE_RECORD
    assert {s for name, s in states.items() if name != "custom.lock"} == {HolderState.FREE}
    assert result.cycles == []
    assert result.kernel_visible


def test_scan_command_table_and_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    locks = _tree(root)
    proc = holders.hold(locks["pack"])
    status, out, err = cli(capsys, "scan", str(root), "--all")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["STATE", "PID", "AGE", "WAITING", "COMMAND", "LOCK"]
    column = lines[0].index("LOCK")
    rows = lines[1:-1]
    assert len(rows) == len(locks)
    assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows)
    held = next(row for row in rows if row.startswith("HELD"))
    assert str(proc.pid) in held
    assert held.endswith("a/.grex-lock")
    assert lines[-1].startswith(f"{len(locks)} locks under {root}: 3 FREE, ")

    # By default only what needs attention, and the counts.
    status, out, err = cli(capsys, "scan", str(root))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["HELD", "STALE_RECORD"]
    assert "1 HELD" in lines[-1]
    assert "1 STALE_RECORD" in lines[-1]
    assert "(3 free, not shown; --all lists every lock)" in lines[-1]

    status, data = cli_json(capsys, "scan", str(root))
    assert status == 0
    assert len(data) == len(locks)
    assert {d["state"] for d in data} == {"FREE", "HELD", "STALE_RECORD"}


def test_scan_command_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for bad in (tmp_path / "missing", tmp_path / "file"):
        if bad.name == "file":
            bad.touch()
        status, _, err = cli(capsys, "scan", str(bad))
        assert status == 2
        assert err.startswith("grex-locks: error:")
        assert "Traceback" not in err


def test_scan_reports_a_real_wait_for_cycle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    x, y = tmp_path / "x" / ".grex-lock", tmp_path / "y" / ".grex-lock"
    for path in (x, y):
        path.parent.mkdir()
        path.touch()
    a = holders.spawn(sys.executable, "-c", CROSS, str(x), str(y))
    b = holders.spawn(sys.executable, "-c", CROSS, str(y), str(x))
    # Both hold their first lock before either reaches for its second.
    assert [read_line(a), read_line(b)] == ["ready", "ready"]
    for proc in (a, b):
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
    wait_until_blocked(y, a.pid)
    wait_until_blocked(x, b.pid)
    result = scan(tmp_path)
    assert len(result.cycles) == 1
    (cycle,) = result.cycles
    assert sorted(cycle.pids) == sorted([a.pid, b.pid])
    waits = dict(zip(cycle.pids, cycle.locks, strict=True))
    assert (waits[a.pid], waits[b.pid]) == (y, x)
    status, out, _ = cli(capsys, "scan", str(tmp_path))
    assert status == 0
    assert f"wait-for cycle (deadlock): pid {min(a.pid, b.pid)} waits for" in out


def _fake(path: str, holders: list[int], waiters: list[int]) -> Diagnosis:
    def proc(pid: int) -> Holder:
        return Holder(pid, "p", [], "sleeping", "u", 0.0)

    return Diagnosis(
        Path(path),
        HolderState.HELD,
        holders=[proc(p) for p in holders],
        waiters=[proc(p) for p in waiters],
    )


def test_find_wait_cycles_on_synthetic_graphs() -> None:
    three = [_fake("/x", [1], [2]), _fake("/y", [2], [3]), _fake("/z", [3], [1])]
    assert find_wait_cycles(three) == [WaitCycle((1, 3, 2), (Path("/z"), Path("/y"), Path("/x")))]
    assert "pid 1 waits for /z held by pid 3" in find_wait_cycles(three)[0].describe()
    chain = [_fake("/x", [1], [2, 4]), _fake("/y", [2], [3])]
    assert find_wait_cycles(chain) == []
    # A process waiting behind its own hold (an abandoned waiter) is no deadlock.
    assert find_wait_cycles([_fake("/x", [1], [1])]) == []


# -- doctor --------------------------------------------------------------------------


def test_doctor_lists_and_prunes_only_stale_records(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    stale, held, orphaned, foreign = (tmp_path / n / ".grex-lock" for n in "abcd")
    for path in (stale, held, orphaned, foreign):
        path.parent.mkdir()
        path.touch()
    holders.kill(holders.hold(stale))
    holders.hold(held)
    holders.kill(holders.hold(orphaned, extra="handoff"))
    holders.kill(holders.hold(foreign))
    holders.hold(foreign, record="none")  # a dead owner's record, a foreign holder now
    records = {p: Path(f"{p}.owner").read_bytes() for p in (stale, held, orphaned, foreign)}

    status, out, _ = cli(capsys, "doctor", str(tmp_path))
    assert status == 0
    assert f"stale: {stale}.owner" in out
    assert out.count("stale: ") == 1
    assert Path(f"{stale}.owner").exists()

    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert status == 0
    assert "removed: its lock was free" in out
    assert not Path(f"{stale}.owner").exists()
    for path in (held, orphaned, foreign):
        assert Path(f"{path}.owner").read_bytes() == records[path]
    status, out, _ = cli(capsys, "doctor", str(tmp_path))
    assert out.startswith("no stale owner records under")
    assert cli(capsys, "doctor", str(tmp_path / "missing"))[0] == 2


def test_prune_rechecks_the_kernel_right_before_removing(tmp_path: Path, holders: Holders) -> None:
    lock = tmp_path / ".grex-lock"
    holders.kill(holders.hold(lock))
    stale = diagnose(lock)
    assert stale.state is HolderState.STALE_RECORD
    proc = holders.hold(lock)  # taken again after the diagnosis: the record is live now
    outcome = prune_stale_record(stale)
    assert not outcome.removed
    assert "held" in outcome.reason
    assert json.loads(Path(f"{lock}.owner").read_text())["pid"] == proc.pid
    holders.kill(proc)
    record = Path(f"{lock}.owner")
    record.unlink()
    record.symlink_to(tmp_path / "elsewhere")
    outcome = prune_stale_record(diagnose(lock))
    assert not outcome.removed
    assert record.is_symlink()


def _take_when_told(conn: multiprocessing.connection.Connection, pack: str) -> None:
    """Keep one lock object; on ("take", spin) spin that long, take it, say so, hold until told."""
    lock = PackLock(pack)
    with lock:
        pass  # the record file exists and is this object's (mapped, where that is safe)
    conn.send("ready")
    while (message := conn.recv()) != "stop":
        until = time.perf_counter() + message[1]
        while time.perf_counter() < until:
            pass
        with lock:
            conn.send(("held", os.getpid()))
            conn.recv()
        conn.send("released")


def _die_holding(pack: str) -> None:
    PackLock(pack).acquire()
    os._exit(0)  # no release: the kernel frees the lock, the record stays behind


@pytest.mark.slow
def test_prune_never_removes_the_record_of_a_holder_that_came_meanwhile(pack: Path) -> None:
    # Each round: a dead holder's record, then a prune racing a new holder
    # that rewrites the record in place (same file, same size). Whatever the
    # interleaving, the new holder's record must be there while it holds.
    ctx = multiprocessing.get_context("fork")
    record = Path(f"{pack}/.grex-lock.owner")
    removed = 0
    with PipedChild("spawn", _take_when_told, str(pack)) as holder:
        holder.expect("ready")
        for round_ in range(150):
            dying = ctx.Process(target=_die_holding, args=(str(pack),))
            dying.start()
            dying.join(DEADLINE)
            stale = diagnose(pack / ".grex-lock")
            assert stale.state is HolderState.STALE_RECORD, stale
            holder.send(("take", random.uniform(0, 0.0005)))
            removed += prune_stale_record(stale).removed
            holder.expect(("held", holder.pid))
            seen = json.loads(record.read_bytes()) if record.exists() else None
            assert seen is not None, f"round {round_}: the holder's record was removed"
            assert seen["pid"] == holder.pid
            holder.send("let go")
            holder.expect("released")
        holder.send("stop")
        assert holder.join() == 0
    assert removed, "no prune ever won the race: the test did not test it"


def test_prune_keeps_a_file_beside_another_that_is_not_an_owner_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Someone's notes.owner beside their notes is no record: scan lists the
    # pair, but doctor --prune must not delete a file it did not write.
    (tmp_path / "notes").write_text("draft\n")
    precious = tmp_path / "notes.owner"
    precious.write_bytes(b"precious notes, not JSON\n")
    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert precious.read_bytes() == b"precious notes, not JSON\n"
    assert "kept: not an owner record (not JSON)" in out, out
    assert status == 0


def test_a_file_that_is_no_record_is_explained_as_such_not_as_a_crash(tmp_path: Path) -> None:
    # A trial found the explanation of any unreadable record claiming a
    # holder that ended without releasing, and promising --prune removes it.
    pack = tmp_path / "pack"
    PackLock(pack).try_acquire().release()
    (pack / ".grex-lock.owner").write_bytes(b"precious notes, not JSON\n")
    d = diagnose(pack / ".grex-lock")
    assert d.state is HolderState.STALE_RECORD, d
    text = d.explain()
    assert "is not an owner record (not JSON)" in text, text
    assert "leaves it alone" in text, text
    assert "ended without releasing" not in text, text


def test_prune_through_a_symlinked_root_the_user_gave_still_prunes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The walk refuses symlinks met on the way; the root the user chose is
    # resolved first, so a workspace reached through a symlink is pruned.
    pack = tmp_path / "real" / "pack"
    pack.mkdir(parents=True)
    dying = multiprocessing.get_context("fork").Process(target=_die_holding, args=(str(pack),))
    dying.start()
    dying.join(DEADLINE)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    status, out, _ = cli(capsys, "doctor", str(tmp_path / "link"), "--prune")
    assert "removed: its lock was free" in out, out
    assert not (pack / ".grex-lock.owner").exists()
    assert status == 0


def test_prune_refuses_a_directory_swapped_for_a_symlink_since_the_scan(tmp_path: Path) -> None:
    # Found by a trial: in a shared directory, a user swaps their own
    # subdirectory for a symlink to another user's directory between root's
    # scan and its removal; the removal must not follow it.
    pack = tmp_path / "shared" / "mine" / "pack"
    pack.mkdir(parents=True)
    dying = multiprocessing.get_context("fork").Process(target=_die_holding, args=(str(pack),))
    dying.start()
    dying.join(DEADLINE)
    stale = diagnose(pack / ".grex-lock")
    assert stale.state is HolderState.STALE_RECORD, stale
    record_bytes = (pack / ".grex-lock.owner").read_bytes()
    victim = tmp_path / "victim" / "pack"
    victim.mkdir(parents=True)
    (victim / ".grex-lock").write_bytes(b"")
    (victim / ".grex-lock.owner").write_bytes(record_bytes)
    (tmp_path / "shared" / "mine").rename(tmp_path / "moved")
    (tmp_path / "shared" / "mine").symlink_to(tmp_path / "victim")
    outcome = prune_stale_record(stale)
    assert not outcome.removed
    assert "is a symlink" in outcome.reason, outcome
    assert (victim / ".grex-lock.owner").read_bytes() == record_bytes
    # Not reached through a symlink, the same kind of record is removed.
    moved = tmp_path / "moved" / "pack"
    assert prune_stale_record(diagnose(moved / ".grex-lock")).removed
    assert not (moved / ".grex-lock.owner").exists()


# -- run -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["sh", "-c", "exit 3"], 3),
        (["/nonexistent/grex-locks-test-cmd"], 127),
        (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
    ],
)
def test_run_exit_status(pack: Path, command: list[str], expected: int) -> None:
    status, err = finish(spawn_cli("run", str(pack), "--", *command))
    assert status == expected
    assert "Traceback" not in err
    if expected == 127:
        assert "command not found" in err
    assert diagnose(pack / ".grex-lock").state is HolderState.FREE


def test_run_command_holds_the_lock_and_sees_the_descriptor(pack: Path) -> None:
    code = (
        "import os, sys; lock = os.path.realpath(sys.argv[1]); "
        "fds = [f for f in os.listdir('/proc/self/fd') "
        "if os.path.realpath('/proc/self/fd/' + f) == lock]; "
        "print(len(fds), flush=True); sys.stdin.read()"
    )
    run = spawn_cli("run", str(pack), "--", sys.executable, "-c", code, str(pack / ".grex-lock"))
    try:
        assert read_line(run) == "1"  # exactly the inherited lock descriptor
        d = diagnose(pack / ".grex-lock")
        assert d.state is HolderState.HELD
        # Both hold it: run, which took it, and CMD, which shares its descriptor.
        command_pids = [child.pid for child in psutil.Process(run.pid).children()]
        assert len(command_pids) == 1
        assert sorted(h.pid for h in d.holders) == sorted([run.pid, *command_pids])
        assert d.owner is not None
        assert d.owner["pid"] == run.pid
    finally:
        status, err = finish(run)
    assert (status, err) == (0, "")


def test_run_when_the_lock_is_held(pack: Path, holders: Holders) -> None:
    proc = holders.hold(pack / ".grex-lock")
    status, err = finish(spawn_cli("run", "--no-wait", str(pack), "--", "true"))
    assert status == 1
    assert f"pid {proc.pid}" in err
    assert "Traceback" not in err
    status, err = finish(spawn_cli("run", str(pack), "--timeout", "0.2", "--", "true"))
    assert status == 1
    assert "timed out" in err
    assert f"pid {proc.pid}" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_passes_signals_on(pack: Path, sig: signal.Signals) -> None:
    run = spawn_cli("run", str(pack), "--", sys.executable, "-c", CHILD)
    read_line(run)
    run.send_signal(sig)
    # The command must end by the signal passed on, not by its stdin closing
    # (which finish() does): so wait for it first, stdin still open.
    run.wait(timeout=DEADLINE)
    status, err = finish(run)
    assert status == 128 + sig
    assert "Traceback" not in err


def test_run_killed_leaves_the_command_holding_an_orphaned_lock(
    capsys: pytest.CaptureFixture[str], pack: Path
) -> None:
    run = spawn_cli("run", str(pack), "--", sys.executable, "-c", CHILD)
    child = int(read_line(run))
    try:
        run.kill()
        run.wait(DEADLINE)
        d = diagnose(pack / ".grex-lock")
        assert d.state is HolderState.ORPHANED
        assert [h.pid for h in d.holders] == [child]
        status, out, _ = cli(capsys, "who", str(pack))
        assert status == 1
        assert "ORPHANED" in out
        assert f"pid {child}" in " ".join(out.split())  # the paragraph is wrapped
    finally:
        os.kill(child, signal.SIGKILL)
        assert run.stdin is not None
        run.stdin.close()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "{missing}", "--", "true"],
        ["run", "{pack}"],
        ["run", "{pack}", "--"],
        ["run", "{pack}", "--timeout", "-1", "--", "true"],
        ["run", "{pack}", "--timeout", "1", "--no-wait", "--", "true"],
        [],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], pack: Path, tmp_path: Path, args: list[str]
) -> None:
    argv = [a.format(pack=pack, missing=tmp_path / "missing") for a in args]
    status, _, err = cli(capsys, *argv)
    assert status == 2
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["who", "scan", "doctor", "run"])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    status, out, _ = cli(capsys, command, "--help")
    assert status == 0
    assert out.startswith(f"usage: grex-locks {command}")


def test_verbose_turns_logging_on(pack: Path) -> None:
    quiet = subprocess.run(
        [*CLI, "scan", str(pack)], capture_output=True, timeout=DEADLINE, check=True
    )
    assert quiet.stderr == b""
    loud = subprocess.run(
        [*CLI, "-v", "scan", str(pack)], capture_output=True, timeout=DEADLINE, check=True
    )
    assert b"scanned" in loud.stderr
    assert loud.stdout == quiet.stdout
