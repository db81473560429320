"""Shared fixtures and helpers for the grex_locks test suite.

- ``LOCK_KINDS`` / the ``kind`` fixture: every file lock kind, so that one
  contract test body runs over all of them.
- :class:`Child`: a function run in a child process under a chosen start
  method (a local ``multiprocessing.get_context``, never the global one),
  talking to the test over a pipe. Every receive has a deadline.
- An autouse fixture that fails any test leaving a hold, a gate registry
  entry or a tier behind, and restores the tier check mode.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest

import grex_locks
from grex_locks import (
    BackendLock,
    LockBusy,
    ManifestLock,
    PackLock,
    Tier,
    WorkspaceBusy,
    WorkspaceLock,
)
from grex_locks._core import fair_queue, tiers

#: The bound on every handshake with a thread or child process. Generous on
#: purpose: it only decides how long a broken test takes to fail.
DEADLINE = 10.0

#: A child holding a lock for the test lets go on its own after this long, so
#: that a test which never tells it to release cannot hang the suite.
HOLD_BACKSTOP = 20.0

START_METHODS = ("spawn", "forkserver", "fork")

AnyLock = PackLock | WorkspaceLock | BackendLock | ManifestLock


@dataclass(frozen=True)
class LockKind:
    """One kind of file lock, built inside a base directory."""

    name: str
    make: Callable[[Path], AnyLock]
    lock_file: Callable[[Path], Path]
    busy_error: type[LockBusy]
    waits: bool
    tier: Tier

    def __str__(self) -> str:
        return self.name


def _make_pack(base: Path) -> AnyLock:
    return PackLock(base)


def _make_workspace(base: Path) -> AnyLock:
    return WorkspaceLock(base)


def _make_backend(base: Path) -> AnyLock:
    return BackendLock(base / "dest")


def _make_manifest(base: Path) -> AnyLock:
    return ManifestLock(base / "m.lock")


LOCK_KINDS: tuple[LockKind, ...] = (
    LockKind(
        "pack",
        _make_pack,
        lambda base: base / grex_locks.PACK_LOCK_FILE_NAME,
        LockBusy,
        True,
        Tier.PER_PACK,
    ),
    LockKind(
        "workspace",
        _make_workspace,
        lambda base: base / grex_locks.SYNC_LOCK_FILE_NAME,
        WorkspaceBusy,
        False,
        Tier.WORKSPACE_SYNC,
    ),
    LockKind(
        "backend",
        _make_backend,
        lambda base: base / ("dest" + grex_locks.BACKEND_LOCK_SUFFIX),
        LockBusy,
        True,
        Tier.BACKEND,
    ),
    LockKind(
        "manifest",
        _make_manifest,
        lambda base: base / "m.lock",
        LockBusy,
        True,
        Tier.MANIFEST,
    ),
)

#: The constructors alone, by kind name (the brief's ``LOCK_FACTORIES``).
LOCK_FACTORIES: dict[str, Callable[[Path], AnyLock]] = {k.name: k.make for k in LOCK_KINDS}


@pytest.fixture(params=LOCK_KINDS, ids=str)
def kind(request: pytest.FixtureRequest) -> LockKind:
    """Each file lock kind in turn."""
    result: LockKind = request.param
    return result


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    """A fresh, existing pack directory."""
    path = tmp_path / "pack"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Fail a test that leaves a gate entry or a held tier; restore the tier check mode.

    A leak is reset after it is reported so that it fails one test, not
    every test after it.
    """
    mode = tiers.tier_check_mode()
    yield
    grex_locks.set_tier_check(mode)
    registered = fair_queue.queues_in_use()
    held = tiers.held_tiers()
    if held:
        tiers.reset_after_fork()
    assert registered == 0, f"{registered} lock queues still in use after the test"
    assert held == (), f"tiers still held after the test: {held}"


def open_fd_count() -> int:
    """How many descriptors this process has open now, after collecting garbage.

    Collecting first keeps descriptors of unreachable objects left by earlier
    code (a lock object, a finished child's pipes) out of the count.
    """
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# -- child processes ----------------------------------------------------------


class ChildFailed(AssertionError):
    """The child process raised; its traceback is the message."""


def _child_entry(
    target: Callable[..., None],
    conn: multiprocessing.connection.Connection,
    args: tuple[Any, ...],
) -> None:
    try:
        target(conn, *args)
    except BaseException:
        conn.send(("child-error", traceback.format_exc()))
        raise


class Child:
    """``target(conn, *args)`` run in a child process started with ``method``.

    The test talks to it with :meth:`send` and :meth:`recv` (which has a
    deadline); leaving the ``with`` block kills a child that is still alive.
    """

    def __init__(self, method: str, target: Callable[..., None], *args: Any) -> None:
        # Any: typeshed's BaseContext lacks Process, though every real context has it.
        ctx: Any = multiprocessing.get_context(method)
        self.conn, child_conn = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(
            target=_child_entry, args=(target, child_conn, args), daemon=True
        )
        self.process.start()
        child_conn.close()

        self.pid: int = self.process.pid or 0

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float = DEADLINE) -> Any:
        """The child's next message; fails the test if none comes in ``timeout`` s."""
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.pid} sent nothing within {timeout} s")
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(DEADLINE)
            raise AssertionError(
                f"child {self.pid} closed its pipe (exit code {self.process.exitcode})"
            ) from None
        if isinstance(message, tuple) and message and message[0] == "child-error":
            raise ChildFailed(message[1])
        return message

    def expect(self, expected: Any, timeout: float = DEADLINE) -> None:
        message = self.recv(timeout)
        assert message == expected, f"child {self.pid} said {message!r}, expected {expected!r}"

    def join(self, timeout: float = DEADLINE) -> int:
        """Wait for the child to exit; its exit code."""
        self.process.join(timeout)
        code = self.process.exitcode
        assert code is not None, f"child {self.pid} still running after {timeout} s"
        return code

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.process.kill()
        self.join()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(DEADLINE)
        self.conn.close()
        if self.process.exitcode is not None:
            self.process.close()  # its sentinel pipe, now rather than at garbage collection


# Child targets shared by several test modules.


def hold_until_told(conn: multiprocessing.connection.Connection, lock: AnyLock) -> None:
    """Hold ``lock``; say ("held", pid); release when told (or after the backstop)."""
    with lock:
        conn.send(("held", os.getpid()))
        if conn.poll(HOLD_BACKSTOP):
            conn.recv()
    conn.send("released")


def try_once(conn: multiprocessing.connection.Connection, lock: AnyLock) -> None:
    """Report what ``lock.try_acquire()`` does here: "acquired" or the error's class name."""
    try:
        hold = lock.try_acquire()
    except LockBusy as exc:
        conn.send(type(exc).__name__)
        return
    hold.release()
    conn.send("acquired")


def acquire_within(
    conn: multiprocessing.connection.Connection, lock: AnyLock, timeout: float
) -> None:
    """Report what a blocking ``acquire(timeout=)`` does here."""
    try:
        hold = lock.acquire(timeout=timeout)
    except grex_locks.LockError as exc:
        conn.send(type(exc).__name__)
        return
    hold.release()
    conn.send("acquired")


def try_in_child(lock: AnyLock, method: str = "fork") -> str:
    """What ``try_acquire`` on ``lock`` does in a fresh child process."""
    with Child(method, try_once, lock) as child:
        result: str = child.recv()
        assert child.join() == 0
        return result


def acquire_in_child(lock: AnyLock, timeout: float = DEADLINE, method: str = "fork") -> str:
    """What a blocking ``acquire(timeout=)`` on ``lock`` does in a fresh child process."""
    with Child(method, acquire_within, lock, timeout) as child:
        result: str = child.recv(timeout + DEADLINE)
        assert child.join() == 0
        return result


# -- threads and the kernel ---------------------------------------------------


def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in another thread and return its result (or raise its exception)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"thread still running after {DEADLINE} s"
    if "error" in box:
        raise box["error"]
    return box.get("result")


class HeldInThread:
    """Hold a lock in a helper thread for the duration of a ``with`` block."""

    def __init__(self, lock: AnyLock) -> None:
        self._lock = lock
        self._held = threading.Event()
        self._let_go = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with self._lock:
                self._held.set()
                self._let_go.wait(HOLD_BACKSTOP)
        except BaseException as exc:  # noqa: BLE001 - reported in __enter__/__exit__
            self._error = exc
            self._held.set()

    def __enter__(self) -> HeldInThread:
        self._thread.start()
        assert self._held.wait(DEADLINE), "helper thread never took the lock"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._let_go.set()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


def blocked_flock_waiters(lock_file: Path) -> set[int]:
    """Pids the kernel lists as blocked waiting for a flock on ``lock_file``."""
    inode = os.stat(lock_file).st_ino
    pids: set[int] = set()
    with open("/proc/locks") as table:
        for line in table:
            fields = line.split()
            if len(fields) < 6 or fields[1] != "->":
                continue
            # "N: -> FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> ..."
            if fields[2] == "FLOCK" and int(fields[6].rsplit(":", 1)[1]) == inode:
                pids.add(int(fields[5]))
    return pids


def wait_until_blocked(lock_file: Path, pid: int, timeout: float = DEADLINE) -> None:
    """Return once process ``pid`` is blocked in the kernel waiting for ``lock_file``.

    The kernel announces a blocked flock only in ``/proc/locks``, so this
    watches that table (with a deadline); it is an observation of the state
    the test needs, not a sleep standing in for one.
    """
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while pid not in blocked_flock_waiters(lock_file):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} never blocked on {lock_file} within {timeout} s")
        pause.wait(0.002)


class CancelWhenBlocked:
    """Set ``cancel`` from a helper thread as soon as ``pid`` is seen blocked on ``lock_file``.

    So the cancel lands while the acquire really waits in the kernel, not
    before it started. :meth:`join` reports whether the wait was observed.
    """

    def __init__(self, lock_file: Path, cancel: Any, pid: int | None = None) -> None:
        self._lock_file = lock_file
        self._cancel = cancel
        self._pid = os.getpid() if pid is None else pid
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            wait_until_blocked(self._lock_file, self._pid)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self._error = exc
        finally:
            self._cancel.set()

    def join(self) -> None:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


#: Threads grex_locks starts for one wait; they must end once that wait is over.
WAIT_HELPER_THREADS = frozenset({"grex-locks-flock-wait", "grex-locks-cancel-watch"})


def join_helper_threads(timeout: float = DEADLINE) -> None:
    """Wait for grex_locks' per-wait helper threads (kernel waits, cancel watchers) to end."""
    for thread in threading.enumerate():
        if thread.name in WAIT_HELPER_THREADS:
            thread.join(timeout)
            assert not thread.is_alive(), f"{thread.name} still alive after {timeout} s"
