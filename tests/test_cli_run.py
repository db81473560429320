"""grex-locks run as other programs start it: with signals ignored, with streams closed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from support import CLI, DEADLINE, read_line

#: CMD: print its ignored-signal mask (the kernel's SigIgn), then wait for stdin to close.
_SHOW_IGNORED = "grep SigIgn /proc/$$/status; echo ready; cat > /dev/null"


def _ignored(line: str) -> int:
    assert line.startswith("SigIgn:"), line
    return int(line.split()[1], 16)


def _bit(sig: signal.Signals) -> int:
    return 1 << (sig - 1)


def _ignore_hangups() -> None:  # pragma: no cover - runs in the child, as nohup does
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_a_signal_the_caller_ignores_stays_ignored_in_run_and_its_command(
    tmp_path: Path, nohup: bool
) -> None:
    # As exec keeps it for any program (nohup, a shell's background job): a
    # hangup neither ends run nor reaches the command.
    run = subprocess.Popen(
        [*CLI, "run", str(tmp_path), "--", "sh", "-c", _SHOW_IGNORED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: read_line selects on the descriptor before each line
        preexec_fn=_ignore_hangups if nohup else None,  # noqa: PLW1509 - a signal disposition only
    )
    try:
        ignored = _ignored(read_line(run))
        assert read_line(run) == "ready"
        assert bool(ignored & _bit(signal.SIGHUP)) is nohup
        assert not ignored & (_bit(signal.SIGINT) | _bit(signal.SIGTERM))
        if nohup:
            run.send_signal(signal.SIGHUP)
        _, err = run.communicate(b"", timeout=DEADLINE)
        assert run.returncode == 0, err
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(DEADLINE)


def test_run_started_with_stdout_closed_keeps_the_commands_status(tmp_path: Path) -> None:
    def close_stdout() -> None:  # pragma: no cover - runs in the child
        os.close(1)

    result = subprocess.run(
        [*CLI, "run", str(tmp_path), "--", "sh", "-c", "exit 5"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=close_stdout,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 5
    assert b"Traceback" not in result.stderr


def test_a_script_without_a_shebang_runs_under_sh(tmp_path: Path) -> None:
    # As execvp (and util-linux flock) run it: the kernel refuses it (ENOEXEC),
    # /bin/sh does not.
    script = tmp_path / "no-shebang"
    script.write_text('echo "script ran with $1"; exit 4\n')
    script.chmod(0o755)
    result = subprocess.run(
        [*CLI, "run", str(tmp_path), "--", str(script), "arg"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 4, result.stderr
    assert result.stdout == b"script ran with arg\n"
