"""A child program that inherits a held lock's descriptor, as CMD under ``grex-locks run`` does.

Usage: ``stress_inheritor.py AUDIT WID LOCK FD LIFE``. Started by a worker
thread of ``scripts/stress.py`` with the descriptor ``FD`` that holds lock
``LOCK``, it writes ``I WID LOCK PID`` to the audit log, says ``ready`` on
stdout and waits on stdin. A ``q`` from the worker ends it at once. End of
file without ``q`` means the worker died (it was killed): then the lock
lives on in this process — the worker's lock is ORPHANED — for ``LIFE``
more seconds. It writes ``J WID LOCK PID`` just before it exits, which
frees the lock. Standard library only, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    audit, wid, lock, _fd, life = argv
    out = os.open(audit, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    os.write(out, f"I {wid} {lock} {os.getpid()}\n".encode())
    try:
        try:
            os.write(1, b"ready\n")
            told = os.read(0, 1)
        except OSError:  # the worker died before it could listen
            told = b""
        if not told:
            # Orphaned: the lock is held by this process alone, as long as it lives.
            time.sleep(float(life))
    finally:
        os.write(out, f"J {wid} {lock} {os.getpid()}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
