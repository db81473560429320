"""``grex-locks run`` under a terminal, and after waiting for its lock.

A Ctrl-C typed at a terminal reaches the whole foreground process group, the
command included, so ``run`` must not pass it on again; a ``kill -INT`` aimed
at ``run`` reaches only ``run``, so it must. Each test runs ``grex-locks run``
as the session leader of a fresh pseudo-terminal (``pty.fork``), in its
foreground group, as a shell would; the test reads the terminal's output
with a deadline.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import DEADLINE, Holders, finish, read_line, spawn_cli, wait_until_blocked

from grex_locks import HolderState, diagnose

#: Say our pid, then wait for stdin to end; SIGINT/SIGQUIT at their default
#: action (no core file: this is about the status).
WAITING = (
    "import os, resource, signal, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "print('pid', os.getpid(), flush=True); sys.stdin.read()"
)

#: Count the SIGINTs that arrive, saying so; on a line of input, say the count and end.
COUNTING = r"""
import os, signal, sys
count = 0
def note(signum, frame):
    global count
    count += 1
    print("got", count, flush=True)
signal.signal(signal.SIGINT, note)
print("pid", os.getpid(), flush=True)
sys.stdin.readline()
print("count", count, flush=True)
"""


class Terminal:
    """``grex-locks ARGS`` as the session leader of a new pseudo-terminal, in its foreground."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.execv(sys.executable, [sys.executable, "-m", "grex_locks", *args])  # noqa: S606
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = b""
        self.status: int | None = None

    def _read(self, deadline: float) -> bool:
        """Read what the terminal shows; ``False`` at its end (every slave side closed)."""
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"nothing more within the deadline; so far: {self.output!r}"
        ready, _, _ = select.select([self.fd], [], [], remaining)
        assert ready, f"nothing more within the deadline; so far: {self.output!r}"
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the last process on the terminal is gone
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: str) -> re.Match[bytes]:
        """Wait for ``pattern`` in the terminal's output."""
        deadline = time.monotonic() + DEADLINE
        while (found := re.search(pattern.encode(), self.output)) is None:
            assert self._read(deadline), f"the terminal closed; it showed: {self.output!r}"
        return found

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self) -> int:
        """``run``'s exit status, once the terminal is closed (everything on it ended)."""
        deadline = time.monotonic() + DEADLINE
        while self._read(deadline):
            pass
        _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.killpg(self.pid, signal.SIGKILL)  # run and its command: one group
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    """Starts a :class:`Terminal` (same arguments) and makes sure none outlives the test."""
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args))
        return started[-1]

    yield start
    for term in started:
        term.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_a_signal_aimed_at_run_in_the_foreground_reaches_the_command(
    tmp_path: Path, terminal: Callable[..., Terminal], sig: signal.Signals
) -> None:
    term = terminal("run", str(tmp_path), "--", sys.executable, "-c", WAITING)
    term.expect(r"pid \d+")
    os.kill(term.pid, sig)  # kill -INT <run>: only run gets it
    assert term.wait() == 128 + sig, term.output


def test_ctrl_c_at_the_terminal_reaches_the_command_once(
    tmp_path: Path, terminal: Callable[..., Terminal]
) -> None:
    term = terminal("run", str(tmp_path), "--", sys.executable, "-c", COUNTING)
    term.expect(r"pid \d+")
    term.type(b"\x03")  # the terminal sends SIGINT to run and the command alike
    term.expect(r"got 1")
    term.type(b"done\n")
    assert term.expect(r"count (\d+)").group(1) == b"1", term.output
    assert term.wait() == 0, term.output


def test_ctrl_c_at_the_terminal_ends_the_command_and_run_by_sigint(
    tmp_path: Path, terminal: Callable[..., Terminal]
) -> None:
    # run dies of the SIGINT too (after letting go), as a shell expects of a
    # program a Ctrl-C ended: a loop around run then stops.
    term = terminal("run", str(tmp_path), "--", sys.executable, "-c", WAITING)
    term.expect(r"pid \d+")
    term.type(b"\x03")
    assert term.wait() == -signal.SIGINT, term.output
    assert diagnose(tmp_path).state is HolderState.FREE


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signals_are_passed_on_after_a_wait_for_the_lock(
    tmp_path: Path, holders: Holders, sig: signal.Signals
) -> None:
    # Waiting leaves the lock library's helper threads behind in run: signals
    # must still reach the command, and its end still end run.
    lock = tmp_path / ".grex-lock"
    holder = holders.hold(lock)
    run = spawn_cli("run", str(tmp_path), "--", sys.executable, "-c", WAITING)
    wait_until_blocked(lock, run.pid)
    holders.kill(holder)
    assert read_line(run).startswith("pid ")
    run.send_signal(sig)
    run.wait(timeout=DEADLINE)
    status, err = finish(run)
    assert status == 128 + sig
    assert "Traceback" not in err

    quick = spawn_cli("run", str(tmp_path), "--", "true")
    assert finish(quick) == (0, "")
