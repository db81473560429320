"""Scenario: diagnose a lock held all along while the kernel's lock table churns.

Usage: ``lock_table_churn.py ROOT SECONDS``. A child process holds a pack
lock (with its owner record) for the whole run; four more processes take and
drop flocks on 60 files each, so that ``/proc/locks`` is longer than one page
and changes while it is read. Prints one JSON line: how many diagnoses were
made and which states other than HELD they reported for the held lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from grex_locks import PackLock
from grex_locks._diagnostics.diagnose import diagnose

HOLD = """
import sys
from grex_locks import PackLock
with PackLock(sys.argv[1]).acquire():
    print("held", flush=True)
    sys.stdin.readline()
"""


def churn(directory: Path, index: int, until: float) -> None:
    """In a forked child: take and drop flocks on 60 files until ``until``."""
    fds = [os.open(directory / f"churn-{index}-{n}", os.O_RDWR | os.O_CREAT) for n in range(60)]
    while time.time() < until:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
    os._exit(0)


def main() -> None:
    root, seconds = Path(sys.argv[1]), float(sys.argv[2])
    pack = root / "pack"
    lock = PackLock(pack)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(pack)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    until = time.time() + seconds + 1.0
    churners = []
    for index in range(4):
        pid = os.fork()
        if pid == 0:
            churn(root, index, until)
        churners.append(pid)
    states: Counter[str] = Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        states[diagnose(lock.path).state.name] += 1
    for pid in churners:
        os.waitpid(pid, 0)
    holder.communicate("\n", timeout=30)
    print(json.dumps({"diagnoses": sum(states.values()), "states": dict(states)}))


if __name__ == "__main__":
    main()
