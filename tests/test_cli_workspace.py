"""The command line on a big workspace, and the details of its surface.

``scan`` shows what needs attention and a line of counts, ``--all`` every
lock, ``--json`` always everything; ``-v`` goes before or after the command;
``--version``; ``run``'s exit statuses and the signals it passes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import CLI, DEADLINE, Holders, cli, finish, read_line, spawn_cli

import grex_locks
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import HolderState

PACKS = 300


@pytest.fixture
def workspace(tmp_path: Path, holders: Holders) -> tuple[Path, dict[str, int]]:
    """A workspace of :data:`PACKS` packs: two held, one with a stale record, the rest free."""
    root = tmp_path / "ws"
    for n in range(PACKS):
        pack = root / "packs" / f"p{n:03d}"
        pack.mkdir(parents=True)
        (pack / ".grex-lock").touch()
    (root / ".grex.sync.lock").touch()
    (root / ".grex.lock").touch()
    pids = {
        "p007": holders.hold(root / "packs" / "p007" / ".grex-lock").pid,
        "p123": holders.hold(root / "packs" / "p123" / ".grex-lock", record="none").pid,
    }
    holders.kill(holders.hold(root / "packs" / "p200" / ".grex-lock"))
    return root, pids


def test_scan_shows_what_needs_attention_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str], workspace: tuple[Path, dict[str, int]]
) -> None:
    root, pids = workspace
    total = PACKS + 2
    status, out, err = cli(capsys, "scan", str(root))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["STATE", "PID"]
    rows = lines[1:-1]
    assert sorted((row.split()[0], row.split()[-1]) for row in rows) == [
        ("HELD", "packs/p007/.grex-lock"),
        ("STALE_RECORD", "packs/p200/.grex-lock"),
        ("UNKNOWN_HOLDER", "packs/p123/.grex-lock"),
    ]
    assert str(pids["p007"]) in next(row for row in rows if row.startswith("HELD"))
    free = total - 3
    assert lines[-1] == (
        f"{total} locks under {root}: {free} FREE, 1 HELD, 1 STALE_RECORD, 1 UNKNOWN_HOLDER "
        f"({free} free, not shown; --all lists every lock)"
    )

    status, out, _ = cli(capsys, "scan", str(root), "--all")
    assert status == 0
    assert len(out.splitlines()) == 1 + total + 1
    assert "not shown" not in out.splitlines()[-1]

    status, out, _ = cli(capsys, "scan", str(root), "--json")
    assert status == 0
    data = json.loads(out)
    assert len(data) == total
    assert sum(d["state"] == "FREE" for d in data) == free
    assert all(d["kind"] in ("pack lock", "workspace sync lock", "manifest lock") for d in data)


def test_scan_of_a_quiet_workspace_prints_only_the_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".grex-lock").touch()
    status, out, _ = cli(capsys, "scan", str(tmp_path))
    assert status == 0
    assert out == (
        f"2 locks under {tmp_path}: 2 FREE (2 free, not shown; --all lists every lock)\n"
    )


# -- the surface ----------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--version")
    assert status == 0
    assert out == f"grex-locks {grex_locks.__version__}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    args = ["-v", "scan", str(tmp_path)] if where == "before" else ["scan", str(tmp_path), "-v"]
    loud = subprocess.run([*CLI, *args], capture_output=True, timeout=DEADLINE, check=True)
    assert b"scanned" in loud.stderr
    quiet = subprocess.run(
        [*CLI, "scan", str(tmp_path)], capture_output=True, timeout=DEADLINE, check=True
    )
    assert quiet.stderr == b""


def test_missing_paths_are_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for args in (["who"], ["scan"], ["doctor"]):
        status, _, err = cli(capsys, *args, str(tmp_path / "missing"))
        assert status == 2
        assert "Traceback" not in err


# -- run --------------------------------------------------------------------------------


def test_run_exits_2_when_the_lock_cannot_be_taken_for_an_io_reason(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".grex-lock")
    status, err = finish(spawn_cli("run", str(tmp_path), "--", "true"))
    assert status == 2
    assert "not a regular file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("what", ["not executable", "a directory"])
def test_run_exits_126_when_the_command_cannot_be_executed(tmp_path: Path, what: str) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    command = tmp_path / "cmd"
    if what == "a directory":
        command.mkdir()
    else:
        command.write_text("#!/bin/sh\nexit 0\n")
        command.chmod(0o644)
    status, err = finish(spawn_cli("run", str(pack), "--", str(command)))
    assert status == 126
    assert f"cannot execute {command}" in err
    assert diagnose(pack).state is HolderState.FREE


#: Print our pid, then live until stdin closes; SIGHUP/SIGQUIT at their default
#: action (no core file: this is about the status).
CHILD = (
    "import os, resource, signal, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "print(os.getpid(), flush=True); sys.stdin.read()"
)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_run_passes_sighup_and_sigquit_on(tmp_path: Path, sig: signal.Signals) -> None:
    run = spawn_cli("run", str(tmp_path), "--", sys.executable, "-c", CHILD)
    child = int(read_line(run))
    assert child != run.pid
    run.send_signal(sig)
    status, err = finish(run)
    assert status == 128 + sig
    assert "Traceback" not in err
    assert diagnose(tmp_path).state is HolderState.FREE


def test_run_help_documents_its_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "run", "--help")
    assert status == 0
    text = " ".join(out.split())
    assert "2 if it could not be taken for an I/O reason" in text
    assert "126 if CMD cannot be executed" in text
    assert "SIGHUP and SIGQUIT are passed on to CMD" in text
