"""Running a command that inherits a held lock, as util-linux ``flock`` does without ``-o``.

The command gets the very descriptor whose open file description holds the
flock, so the lock covers it even if ``grex-locks run`` itself is killed:
the lock is freed only when the last process holding that description
exits (or ``run`` releases it after the command ends).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


def _terminal_sent_it() -> bool:
    # A Ctrl-C (or Ctrl-\) at a terminal reaches the whole foreground process
    # group, the command included; forwarding it too would deliver it twice.
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


#: Signals sent to ``grex-locks run`` that are passed on to its command.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Signals a terminal sends to its whole foreground process group (the command too).
_TERMINAL_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT})


def run_holding(command: list[str], lock_fd: int) -> int:
    """Run ``command`` with ``lock_fd`` inherited; return its exit status as a shell would.

    127 when the command is not found, 126 when it cannot be executed (not
    permitted, not an executable format, a directory), 128+N when it died of
    signal N. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process are
    passed on to the command (SIGINT and SIGQUIT only when a terminal did not
    already send them to the whole foreground group).
    """
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        if child is None:
            pending.append(signum)
        elif not (signum in _TERMINAL_SIGNALS and _terminal_sent_it()):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        try:
            # pass_fds: the command inherits the descriptor that holds the
            # flock, so the lock covers it even if this process is killed.
            child = subprocess.Popen(command, pass_fds=(lock_fd,))
        except FileNotFoundError:
            print(f"grex-locks: error: command not found: {command[0]}", file=sys.stderr)
            return 127
        except OSError as exc:
            why = exc.strerror or str(exc)
            print(f"grex-locks: error: cannot execute {command[0]}: {why}", file=sys.stderr)
            return 126
        for signum in pending:
            forward(signum, None)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status
