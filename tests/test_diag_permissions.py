"""A lock the caller may not look at is reported as such (EACCES and the path), never as free.

The locks are held by this (root) process's children; the diagnostics run as
another user (``nobody``, through ``setpriv``), for whom the directories are
closed. No mock: the kernel refuses for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import CLI, DEADLINE, Holders, read_line

from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import HolderState

SETPRIV = shutil.which("setpriv")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv(1) to act as nobody"
)
NOBODY = [str(SETPRIV), "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as user nobody; its status and output."""
    return subprocess.run(
        [*NOBODY, *argv], capture_output=True, text=True, timeout=DEADLINE * 3, cwd=cwd, check=False
    )


def cli_as_nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return as_nobody(*CLI, *args, cwd=cwd)


def as_json(run: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    data = json.loads(run.stdout)
    assert isinstance(data, list)
    return data


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may enter (pytest's own temporary tree is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="grex-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)  # root ignores the modes the tests set


@pytest.fixture
def private(base: Path, holders: Holders) -> Path:
    """``base/private``, mode 000, whose pack lock a live process holds (with its record)."""
    path = base / "private"
    path.mkdir()
    holders.hold(path / ".grex-lock")
    path.chmod(0o000)
    return path


def test_who_on_a_lock_in_a_closed_directory_says_eacces(base: Path, private: Path) -> None:
    lock = private / ".grex-lock"
    run = cli_as_nobody("who", str(lock), "--json", cwd=base)
    assert run.returncode == 1, run.stderr  # a state other than FREE / STALE_RECORD
    (found,) = as_json(run)
    assert found["state"] == "UNREADABLE"
    assert "EACCES" in found["note"]
    assert str(lock) in found["note"]

    run = cli_as_nobody("who", str(private), cwd=base)
    assert run.returncode == 1
    assert "no such file" not in run.stderr
    assert f"{private}: UNREADABLE" in run.stdout
    assert "EACCES" in run.stdout
    assert "FREE" not in run.stdout


def test_diagnose_of_a_closed_pack_is_unreadable_not_free(base: Path, private: Path) -> None:
    code = (
        "import sys; from grex_locks import diagnose; d = diagnose(sys.argv[1]); "
        "print(d.state.name); print(d.note); print(d.explain())"
    )
    run = as_nobody(sys.executable, "-c", code, str(private), cwd=base)
    assert run.returncode == 0, run.stderr
    state, note, text = run.stdout.splitlines()
    assert state == "UNREADABLE"
    assert "permission denied (EACCES)" in note
    assert str(private / ".grex-lock") in note
    assert "not reported free" in text


def test_scan_lists_what_it_could_not_enter(base: Path, private: Path) -> None:
    (base / "open").mkdir()
    (base / "open" / ".grex-lock").touch()
    run = cli_as_nobody("scan", str(base), cwd=base)
    assert run.returncode == 2
    rows = run.stdout.splitlines()
    unreadable = [row for row in rows if row.startswith("UNREADABLE")]
    assert len(unreadable) == 1
    assert "private" in unreadable[0]
    assert "EACCES" in unreadable[0]
    assert "could not be read" in run.stderr
    assert rows[-1].startswith(f"1 lock and 1 unreadable path under {base}: 1 FREE, 1 UNREADABLE")

    run = cli_as_nobody("scan", str(base), "--json", cwd=base)
    assert run.returncode == 2
    states = {Path(d["path"]).relative_to(base).as_posix(): d["state"] for d in as_json(run)}
    assert states == {"open/.grex-lock": "FREE", "private": "UNREADABLE"}

    code = (
        "import sys; from grex_locks import scan; r = scan(sys.argv[1]); "
        "print([str(d.path) for d in r.unreadable])"
    )
    run = as_nobody(sys.executable, "-c", code, str(base), cwd=base)
    assert run.stdout.strip() == repr([str(private)])


def test_a_searchable_but_unlistable_directory_still_shows_its_locks(
    base: Path, holders: Holders
) -> None:
    closed = base / "closed"
    closed.mkdir()
    proc = holders.hold(closed / ".grex-lock")
    closed.chmod(0o711)
    run = cli_as_nobody("who", str(closed), "--json", cwd=base)
    assert run.returncode == 1
    found = {Path(d["path"]).name: d for d in as_json(run)}
    assert found["closed"]["state"] == "UNREADABLE"
    assert found[".grex-lock"]["state"] == "HELD"
    assert found[".grex-lock"]["holders"][0]["pid"] == proc.pid


def test_a_record_the_caller_cannot_read_is_named_so(base: Path, holders: Holders) -> None:
    lock = base / ".grex-lock"
    proc = holders.hold(lock)
    Path(f"{lock}.owner").chmod(0o600)
    run = cli_as_nobody("who", str(lock), "--json", cwd=base)
    (found,) = as_json(run)
    assert found["state"] == "UNKNOWN_HOLDER"
    assert "EACCES" in found["record_problem"]
    assert proc.pid in found["lock_pids"]


def test_a_closed_root_is_reported_not_called_missing(base: Path, private: Path) -> None:
    for root in (private, private / "inside"):
        for command in ("scan", "doctor"):
            run = cli_as_nobody(command, str(root), cwd=base)
            assert run.returncode == 2, (command, root)
            assert "no such" not in run.stderr
            assert "EACCES" in run.stdout + run.stderr
        run = cli_as_nobody("scan", str(root), "--json", cwd=base)
        (found,) = as_json(run)
        assert (found["path"], found["state"]) == (str(root), "UNREADABLE")


#: Hold argv[1]'s pack lock with grex_locks; say "ready"; hold until stdin closes.
PACK_HOLDER = (
    "import sys; from grex_locks import PackLock; hold = PackLock(sys.argv[1]).acquire(); "
    "print('ready', flush=True); sys.stdin.read()"
)


def test_another_users_record_the_holder_cannot_replace_is_named(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # a sticky shared directory: nobody may replace root's files
    lock = shared / ".grex-lock"
    lock.touch()
    record = Path(f"{lock}.owner")
    left = b'{"pid": 1, "create_time": 1.0, "argv": ["an", "older", "writer"]}'
    record.write_bytes(left)
    record.chmod(0o644)
    holder = subprocess.Popen(
        [*NOBODY, sys.executable, "-c", PACK_HOLDER, str(shared)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=base,
    )
    try:
        assert read_line(holder) == "ready"
        d = diagnose(shared)
        assert d.state is HolderState.UNKNOWN_HOLDER
        assert [h.pid for h in d.holders] == [holder.pid]
        assert d.record_user == "root"
        text = d.explain()
        assert f"Its owner record {record} belongs to user root" in text
        assert "the holder runs as nobody" in text
        # What it says happened did: the holder took the lock, its record is not there.
        assert record.read_bytes() == left
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(DEADLINE)
        assert holder.stdout is not None
        holder.stdout.close()
