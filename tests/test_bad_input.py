"""Programming errors and impossible paths fail at the call, saying what was wrong.

- ``cancel=`` that is not an event (``True``, ``object()``) is a ``TypeError``
  at every public acquire, never a "cancelled" wait; an event that breaks
  later (a dead Manager) still ends the wait as cancelled.
- A lock whose directory is a regular file is a ``LockIOError`` that says
  so, with the ``OSError`` as its cause; ``grex-locks run FILE`` exits 2
  with the same sentence.
- ``timeout=inf`` (and ``--timeout inf``) waits with no deadline.
"""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    CLI,
    DEADLINE,
    HeldInThread,
    Holders,
    InThread,
    finish,
    spawn_cli,
    until,
    wait_until_blocked,
)

from grex_locks import (
    PACK_LOCK_FILE_NAME,
    BackendLock,
    LockCancelled,
    LockIOError,
    ManifestLock,
    PackLock,
    Scheduler,
    WorkspaceLock,
    acquire_all,
)

# -- cancel= must be an event -------------------------------------------------------------------


class _IsSetOnly:
    def is_set(self) -> bool:
        return False


class _WaitNotCallable:
    wait = 5

    def is_set(self) -> bool:
        return False


class _DuckEvent:
    """Not a threading.Event, but has what cancel= needs."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


NOT_EVENTS: list[Any] = [
    True,
    False,
    1,
    "yes",
    object(),
    threading.Lock(),
    _IsSetOnly(),
    _WaitNotCallable(),
]

Acquire = Callable[[Any], Any]


def _entry_points(base: Path) -> dict[str, tuple[Acquire, Callable[[], None]]]:
    """name -> (acquire with a given cancel, check that nothing is held afterwards)."""
    pack = PackLock(base / "pack")
    workspace = WorkspaceLock(base / "ws")
    backend = BackendLock(base / "repo")
    manifest = ManifestLock(base / "m.lock")
    local = Scheduler(1)
    shared = Scheduler(1, slots_dir=base / "slots")
    group = [PackLock(base / "a"), PackLock(base / "b")]

    def free(lock: PackLock | WorkspaceLock | BackendLock | ManifestLock) -> Callable[[], None]:
        def check() -> None:
            assert not lock.held
            InThread(lambda: lock.try_acquire().release()).result()

        return check

    def free_scheduler(scheduler: Scheduler) -> Callable[[], None]:
        return lambda: InThread(lambda: scheduler.try_acquire().release()).result()

    def free_group() -> None:
        for lock in group:
            free(lock)()

    return {
        "PackLock.acquire": (lambda c: pack.acquire(cancel=c), free(pack)),
        "WorkspaceLock.acquire": (lambda c: workspace.acquire(cancel=c), free(workspace)),
        "BackendLock.acquire": (lambda c: backend.acquire(cancel=c), free(backend)),
        "ManifestLock.acquire": (lambda c: manifest.acquire(cancel=c), free(manifest)),
        "ManifestLock.read": (lambda c: manifest.read(cancel=c), free(manifest)),
        "ManifestLock.write": (lambda c: manifest.write(cancel=c), free(manifest)),
        "Scheduler.acquire": (lambda c: local.acquire(cancel=c), free_scheduler(local)),
        "Scheduler(slots_dir).acquire": (
            lambda c: shared.acquire(cancel=c),
            free_scheduler(shared),
        ),
        "acquire_all": (lambda c: acquire_all(group, cancel=c), free_group),
    }


ENTRY_NAMES = [
    "PackLock.acquire",
    "WorkspaceLock.acquire",
    "BackendLock.acquire",
    "ManifestLock.acquire",
    "ManifestLock.read",
    "ManifestLock.write",
    "Scheduler.acquire",
    "Scheduler(slots_dir).acquire",
    "acquire_all",
]


@pytest.mark.parametrize("entry", ENTRY_NAMES)
@pytest.mark.parametrize("cancel", NOT_EVENTS, ids=lambda c: type(c).__name__)
def test_a_cancel_that_is_not_an_event_is_a_type_error(
    tmp_path: Path, entry: str, cancel: Any
) -> None:
    take, nothing_held = _entry_points(tmp_path)[entry]
    with pytest.raises(TypeError) as caught:
        take(cancel).release()
    text = str(caught.value)
    assert "cancel" in text
    assert "is_set()" in text
    assert "wait(" in text
    assert "threading.Event" in text
    assert type(cancel).__name__ in text
    nothing_held()


@pytest.mark.parametrize("entry", ENTRY_NAMES)
def test_anything_with_is_set_and_wait_is_a_cancel_event(tmp_path: Path, entry: str) -> None:
    take, nothing_held = _entry_points(tmp_path)[entry]
    take(_DuckEvent()).release()
    take(threading.Event()).release()
    take(None).release()
    nothing_held()


def test_a_manager_event_is_accepted_and_a_dead_one_cancels(tmp_path: Path) -> None:
    """A Manager Event passes the check; once its Manager is gone, the wait ends cancelled."""
    lock = PackLock(tmp_path / "pack")
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager()
    try:
        cancel = manager.Event()
        lock.acquire(cancel=cancel).release()
    finally:
        manager.shutdown()
    with HeldInThread(PackLock(tmp_path / "pack")), pytest.raises(LockCancelled):
        lock.acquire(timeout=DEADLINE, cancel=cancel)
    with pytest.raises(LockCancelled):
        lock.acquire(timeout=DEADLINE, cancel=cancel)
    assert not lock.held


# -- a lock whose directory is not a directory ---------------------------------------------------


def _regular_file(tmp_path: Path) -> Path:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    return afile


MAKERS: dict[str, Callable[[Path], object]] = {
    "PackLock": PackLock,
    "PackLock below": lambda f: PackLock(f / "sub"),
    "WorkspaceLock": WorkspaceLock,
    "BackendLock": lambda f: BackendLock(f / "dest"),
    "ManifestLock": lambda f: ManifestLock(f / "m.lock"),
    "ManifestLock below": lambda f: ManifestLock(f / "deeper" / "m.lock"),
    "Scheduler": lambda f: Scheduler(2, slots_dir=f),
    "Scheduler below": lambda f: Scheduler(2, slots_dir=f / "slots"),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_a_regular_file_where_the_directory_should_be(
    tmp_path: Path, make: Callable[[Path], object]
) -> None:
    afile = _regular_file(tmp_path)
    with pytest.raises(LockIOError) as caught:
        make(afile)
    text = str(caught.value)
    assert f"{afile} is a regular file, not a directory" in text, text
    assert "File exists" not in text
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.path is not None
    assert str(caught.value.path).startswith(str(afile))
    assert afile.read_text() == "not a directory\n"


def test_a_dangling_symlink_where_the_directory_should_be(tmp_path: Path) -> None:
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(LockIOError) as caught:
        PackLock(link)
    assert f"{link} is a symlink to nothing, not a directory" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


def test_run_on_a_regular_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    afile = _regular_file(tmp_path)
    done = subprocess.run(
        [*CLI, "run", str(afile), "--", "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 2, done
    assert f"{afile} is a regular file, not a directory" in done.stderr
    assert "File exists" not in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- timeout=inf waits with no deadline ------------------------------------------------------------


Case = tuple[Any, Callable[[], Any], Callable[[], int]]


def _infinite_cases(base: Path, timeout: float) -> dict[str, Case]:
    """name -> (what a helper thread holds, the take with ``timeout``, threads waiting now)."""
    pack = PackLock(base / "pack")
    manifest = ManifestLock(base / "m.lock")
    shared = Scheduler(1, slots_dir=base / "slots")
    local = Scheduler(1)
    group = [PackLock(base / "a"), PackLock(base / "b")]
    return {
        "PackLock": (
            PackLock(pack.path.parent),
            lambda: pack.acquire(timeout=timeout),
            lambda: pack.statistics().threads_waiting,
        ),
        "ManifestLock.read": (
            ManifestLock(manifest.path),
            lambda: manifest.read(timeout=timeout),
            lambda: manifest.statistics().threads_waiting,
        ),
        "Scheduler(slots_dir)": (
            lambda: shared.acquire(timeout=DEADLINE),
            lambda: shared.acquire(timeout=timeout),
            lambda: shared.statistics().threads_waiting,
        ),
        "Scheduler": (
            lambda: local.acquire(timeout=DEADLINE),
            lambda: local.acquire(timeout=timeout),
            lambda: local.statistics().threads_waiting,
        ),
        "acquire_all": (
            PackLock(group[0].path.parent),
            lambda: acquire_all(group, timeout=timeout),
            lambda: group[0].statistics().threads_waiting,
        ),
    }


INFINITE_CASES = [
    "PackLock",
    "ManifestLock.read",
    "Scheduler(slots_dir)",
    "Scheduler",
    "acquire_all",
]


@pytest.mark.parametrize("case", INFINITE_CASES)
@pytest.mark.parametrize("timeout", [math.inf, 1e300], ids=["inf", "1e300"])
def test_an_infinite_timeout_waits_until_granted(tmp_path: Path, timeout: float, case: str) -> None:
    hold, take, waiting = _infinite_cases(tmp_path, timeout)[case]

    def take_and_release() -> bool:
        with take():
            return True

    holder = HeldInThread(hold)
    try:
        waiter = InThread(take_and_release)
        until(lambda: waiting() > 0 or not waiter.thread.is_alive(), "the waiter to queue")
        assert waiter.thread.is_alive(), waiter.result()
    finally:
        holder.release()
    assert waiter.result() is True


def test_run_timeout_inf_waits_for_the_lock(tmp_path: Path, holders: Holders) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    lock_file = pack / ".grex-lock"
    PackLock(pack)  # creates the lock file
    holder = holders.hold(lock_file)
    run = spawn_cli("run", str(pack), "--timeout", "inf", "--", "true")
    try:
        wait_until_blocked(lock_file, run.pid)
        assert run.poll() is None
    finally:
        holders.kill(holder)
    status, err = finish(run)
    assert status == 0, err
    assert err == ""


# -- what to do about it ---------------------------------------------------------------------------


def test_a_refused_lock_file_says_what_to_do(tmp_path: Path) -> None:
    # Found by a trial: the refusals named the lock but not the fix.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / PACK_LOCK_FILE_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LockIOError) as caught:
        PackLock(linked)
    assert f"remove it with `rm {linked / PACK_LOCK_FILE_NAME}`" in str(caught.value)
    blocked = tmp_path / "blocked"
    (blocked / PACK_LOCK_FILE_NAME).mkdir(parents=True)
    with pytest.raises(LockIOError) as caught:
        PackLock(blocked)
    assert "a directory sits where the lock file should be (move it away)" in str(caught.value)


@pytest.mark.parametrize("command", ["who", "scan", "doctor", "run"])
def test_an_empty_path_on_the_command_line_is_an_error_not_the_current_directory(
    command: str,
) -> None:
    # An unset shell variable ("$PACK") must not quietly mean ".".
    argv = [*CLI, command, ""] + (["--", "true"] if command == "run" else [])
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2, done
    assert "an empty path names nothing" in done.stderr
    assert done.stdout == ""
