"""What the command line prints, judged as a person (or a shell) would read it.

A directory named like a record is still a directory; commands are quoted so
a shell takes them back word for word; the table stays in line with wide
characters; a prune the system refuses is an error. Holders are real
processes, util-linux ``flock(1)`` among them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CLI, DEADLINE, Holders, cli, read_line

FLOCK = shutil.which("flock")
needs_flock = pytest.mark.skipif(FLOCK is None, reason="needs util-linux flock(1)")

#: The command flock(1) runs while it holds the lock: say so, then wait for stdin to close.
HOLDING = ["sh", "-c", "echo ready; exec cat"]

#: Hold the pack lock of the directory named on stdin's first line (recording
#: sys.argv), say so, wait for stdin to close.
PYTHON_HOLDER = (
    "import sys; from grex_locks import PackLock; "
    "PackLock(sys.stdin.readline().strip()).acquire(); "
    "print('ready', flush=True); sys.stdin.read()"
)


@pytest.fixture
def flock_in(holders: Holders) -> Iterator[object]:
    """``flock_in(cwd, lock, *words)``: flock(1) holding ``lock`` (relative to ``cwd``)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cwd: Path, lock: str, *words: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(FLOCK), lock, *HOLDING, *words],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        started.append(proc)
        assert read_line(proc) == "ready"
        return proc

    yield start
    for proc in started:
        assert proc.stdin is not None
        proc.stdin.close()  # cat ends, then flock
        proc.wait(DEADLINE)
        assert proc.stdout is not None
        proc.stdout.close()


def _cells(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _commands(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


# -- who: a directory is a directory ---------------------------------------------------


@needs_flock
def test_who_on_a_pack_named_like_a_record_diagnoses_the_pack(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flock_in: object
) -> None:
    pack = tmp_path / "team.owner"
    pack.mkdir()
    (pack / ".grex-lock").touch()
    flock_in(tmp_path, "team.owner/.grex-lock")  # type: ignore[operator]
    status, out, _ = cli(capsys, "who", str(pack))
    assert status == 1
    assert out.startswith(f"{pack / '.grex-lock'}: UNKNOWN_HOLDER\n")
    assert "rmdir" not in out
    assert str(tmp_path / "team") + ":" not in out


def test_who_on_a_record_file_still_diagnoses_its_lock(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lock = tmp_path / "custom.lock"
    lock.touch()
    Path(f"{lock}.owner").write_text('{"pid": 4000000, "create_time": 1.0}')
    status, out, _ = cli(capsys, "who", f"{lock}.owner")
    assert status == 0
    assert out.startswith(f"{lock}: STALE_RECORD\n")


def test_who_on_a_directory_at_a_record_path_points_at_its_lock(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lock = tmp_path / "a b" / ".grex-lock"
    lock.parent.mkdir()
    lock.touch()
    Path(f"{lock}.owner").mkdir()
    status, out, _ = cli(capsys, "who", f"{lock}.owner")
    assert status == 0
    assert "no grex lock files in this directory" in out
    assert [shlex.split(c) for c in _commands(out)] == [["grex-locks", "who", str(lock)]]


# -- commands a shell takes back ---------------------------------------------------------


def test_doctor_quotes_the_paths_in_what_it_says_to_type(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fifo_lock, dir_lock = (tmp_path / name / ".grex-lock" for name in ("a b", "it's"))
    for lock in (fifo_lock, dir_lock):
        lock.parent.mkdir()
        lock.touch()
    os.mkfifo(f"{fifo_lock}.owner")
    Path(f"{dir_lock}.owner").mkdir()
    status, out, _ = cli(capsys, "doctor", str(tmp_path), "--prune")
    assert status == 0
    typed = sorted(shlex.split(c) for c in _commands(out))
    assert typed == [["rm", f"{fifo_lock}.owner"], ["rmdir", f"{dir_lock}.owner"]]


def test_who_never_wraps_a_paragraph_inside_a_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pack = tmp_path / ("a long directory name with spaces " * 2).strip()
    pack.mkdir()
    os.mkfifo(pack / ".grex-lock")
    _, out, _ = cli(capsys, "who", str(pack))
    commands = _commands(out)
    assert commands
    assert all("\n" not in command for command in commands), out


# -- scan's table --------------------------------------------------------------------------


@needs_flock
def test_scan_shows_a_holders_command_quoted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flock_in: object
) -> None:
    (tmp_path / ".grex-lock").touch()
    flock_in(tmp_path, ".grex-lock")  # type: ignore[operator]
    status, out, _ = cli(capsys, "scan", str(tmp_path))
    assert status == 0
    (row,) = out.splitlines()[1:-1]
    assert "flock .grex-lock sh -c 'echo ready; exec cat'  " in row


def test_scan_shows_a_python_c_holders_record_as_python_c(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, holders: Holders
) -> None:
    for name, extra in (("bare", []), ("args", ["two words"])):
        pack = tmp_path / name
        pack.mkdir()
        proc = holders.spawn(sys.executable, "-c", PYTHON_HOLDER, *extra)
        assert proc.stdin is not None
        proc.stdin.write(f"{pack}\n".encode())
        assert read_line(proc) == "ready"
        holders.kill(proc)  # its record stays behind: STALE_RECORD
    status, out, _ = cli(capsys, "scan", str(tmp_path))
    assert status == 0
    header, *rows, _ = out.splitlines()
    column = slice(header.index("COMMAND"), header.index("LOCK"))
    shown = {row.split()[-1]: (row.split()[0], row[column].rstrip()) for row in rows}
    assert shown == {
        "bare/.grex-lock": ("STALE_RECORD", "python -c"),
        "args/.grex-lock": ("STALE_RECORD", "python -c 'two words'"),
    }


@needs_flock
def test_scan_table_stays_in_line_with_wide_characters(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flock_in: object
) -> None:
    for name, word in (("a", "plain"), ("b", "包裹同步")):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".grex-lock").touch()
        flock_in(tmp_path / name, ".grex-lock", word)  # type: ignore[operator]
    status, out, _ = cli(capsys, "scan", str(tmp_path))
    assert status == 0
    lines = out.splitlines()[:-1]
    assert len(lines) == 3
    assert "包裹同步" in out
    starts = {_cells(line[: line.rindex("  ") + 2]) for line in lines}
    assert len(starts) == 1, out


# -- doctor --prune, refused ------------------------------------------------------------------

SETPRIV = shutil.which("setpriv")


def _doctor_prune(root: Path) -> subprocess.CompletedProcess[str]:
    """``doctor --prune`` run by a user who may read ``root`` but not remove from it."""
    argv = [*CLI, "doctor", str(root), "--prune"]
    if os.geteuid() == 0:
        # root removes anything: act as nobody, for whom the directory is closed.
        argv = [str(SETPRIV), "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=DEADLINE * 3, check=False, cwd="/"
    )


@pytest.mark.skipif(
    os.geteuid() == 0 and SETPRIV is None, reason="as root, needs setpriv(1) to act as nobody"
)
def test_doctor_prune_that_cannot_remove_a_record_is_an_error(holders: Holders) -> None:
    root = Path(tempfile.mkdtemp(prefix="grex-prune-"))
    try:
        pack = root / "pack"
        pack.mkdir()
        holders.kill(holders.hold(pack / ".grex-lock"))
        record = pack / ".grex-lock.owner"
        assert record.exists()
        root.chmod(0o755)
        pack.chmod(0o555)  # readable, but nothing in it can be removed
        run = _doctor_prune(root)
        assert run.returncode == 2, (run.stdout, run.stderr)
        assert "kept: cannot remove" in run.stdout
        assert run.stderr.startswith("grex-locks: error: 1 stale record could not be removed")
        assert str(record) in run.stderr
        assert "Traceback" not in run.stderr
        assert record.exists()
    finally:
        pack.chmod(0o755)
        shutil.rmtree(root)
