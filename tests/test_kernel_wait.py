"""A retry loop of short timeouts keeps one kernel-wait helper per lock file, not one per try."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import DEADLINE

from grex_locks import LockCancelled, LockTimeout, PackLock
from grex_locks._core import kernel_wait
from grex_locks._core.fair_queue import queues_in_use as registry_size

_HOLD = (
    "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()"
)


@pytest.mark.timeout(60)
def test_a_timeout_retry_loop_reuses_one_helper_and_gets_the_lock_when_freed(
    tmp_path: Path,
) -> None:
    lock = PackLock(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        for attempt in range(20):
            with pytest.raises(LockTimeout):
                lock.acquire(timeout=0.005)
            cancel = threading.Event()
            if attempt % 2:
                cancel.set()  # already set: cancelled before any wait
            with pytest.raises((LockCancelled, LockTimeout)):
                lock.acquire(timeout=0.005, cancel=cancel)
            # The helper left behind by one try is taken over by the next.
            assert kernel_wait.idle_count() <= 1
        assert registry_size() == 0
    finally:
        holder.communicate("\n", timeout=DEADLINE)
    # Once the holder is gone, the next acquire gets the lock (taking the
    # left-behind helper over, or at once), and no helper is left waiting.
    with lock.acquire(timeout=DEADLINE):
        assert lock.held
    for thread in threading.enumerate():
        if thread.name == "grex-locks-flock-wait":
            thread.join(DEADLINE)
            assert not thread.is_alive()
    assert kernel_wait.idle_count() == 0
