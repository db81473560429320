"""A retry loop of short timeouts keeps one kernel-wait helper per lock file, not one per try."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import DEADLINE, join_helper_threads, until

from grex_locks import LockCancelled, LockTimeout, PackLock
from grex_locks._core import kernel_wait, waiting
from grex_locks._core.fair_queue import queues_in_use as registry_size

_HOLD = (
    "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()"
)


def _held_elsewhere(lock: PackLock) -> subprocess.Popen[str]:
    """A process holding ``lock``'s file with raw flock until it reads a line."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.timeout(60)
def test_a_timeout_retry_loop_reuses_one_helper_and_gets_the_lock_when_freed(
    tmp_path: Path,
) -> None:
    lock = PackLock(tmp_path)
    holder = _held_elsewhere(lock)
    try:
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


@pytest.mark.timeout(60)
def test_a_retry_loop_with_one_cancel_event_keeps_one_watcher_thread(tmp_path: Path) -> None:
    # Found by a trial: each acquire(cancel=ev) started its own watcher, which
    # lingered 0.25 s in ev.wait(): 300 tries of 10 ms left 24 threads (and,
    # with a Manager Event, 24 connections to the manager) at once.
    join_helper_threads()  # the watchers of earlier tests' events, each ending within 0.25 s
    lock = PackLock(tmp_path)
    holder = _held_elsewhere(lock)
    cancel = threading.Event()
    most = 0
    try:
        for _ in range(100):
            with pytest.raises(LockTimeout):
                lock.acquire(timeout=0.002, cancel=cancel)
            watchers = [t for t in threading.enumerate() if t.name == "grex-locks-cancel-watch"]
            most = max(most, len(watchers))

        # The one watcher still serves a wait that the event then cancels:
        # set once that wait is registered with the watch, not after a delay
        # (set before the wait began, it would be refused without one).
        def cancel_once_watched() -> None:
            until(lambda: bool(getattr(waiting._watches.get(id(cancel)), "wakes", ())), "a wait")
            cancel.set()

        setter = threading.Thread(target=cancel_once_watched)
        setter.start()
        with pytest.raises(LockCancelled):
            lock.acquire(timeout=DEADLINE, cancel=cancel)
        setter.join(DEADLINE)
    finally:
        holder.communicate("\n", timeout=DEADLINE)
    # (A second one may be seen for a moment: started as the first ended.)
    assert most <= 2, f"{most} cancel watcher threads at once"


def _blocked_signals(thread: threading.Thread) -> int:
    """The signal mask of ``thread`` as the kernel shows it (``SigBlk``), as a bit set."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
    return int(line.split()[1], 16)


@pytest.mark.timeout(60)
def test_helper_threads_block_signals_and_leave_the_callers_mask_alone(tmp_path: Path) -> None:
    # A helper left waiting in flock must not take a signal meant for a
    # program that collects its signals with sigwait (grex-locks run does).
    lock = PackLock(tmp_path)
    holder = _held_elsewhere(lock)
    try:
        before = _blocked_signals(threading.current_thread())
        with pytest.raises(LockTimeout):
            lock.acquire(timeout=0.01)
        helpers = [t for t in threading.enumerate() if t.name == "grex-locks-flock-wait"]
        assert helpers
        for helper in helpers:
            mask = _blocked_signals(helper)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
                assert mask & (1 << (signum - 1)), f"{signum!r} reaches {helper.name}"
        assert _blocked_signals(threading.current_thread()) == before
    finally:
        holder.communicate("\n", timeout=DEADLINE)
    join_helper_threads()  # each gets the lock once the holder is gone, and drops it
