"""The one test-support module: constants, helpers and child targets for the whole suite.

Plain functions, classes and constants only: fixtures and pytest hooks live in
``conftest.py``. This module does not import pytest at run time, so that a
``spawn``/``forkserver`` child (and the helper processes of
``test_fork_properties.py`` and ``test_shared_dirs.py``) can import it by name
and run the module-level targets below. Every wait on a thread, a child
process or the kernel has a deadline, so that a broken lock fails a test
instead of hanging it.

- Time bounds: :data:`DEADLINE`, :data:`HOLD_BACKSTOP`.
- The lock kinds: :class:`LockKind`, :data:`LOCK_KINDS`.
- Observing state nothing signals: :func:`until`, :func:`flock_waiters`,
  :func:`wait_until_blocked`, :class:`CancelWhenBlocked`, :func:`join_helper_threads`.
- What another process sees: :func:`flock_n`, :func:`third_process_can_take`, and
  the owner record (:func:`owner_record`, :func:`holder_record`).
- Threads: :class:`InThread`, :class:`HeldInThread`, :func:`must_wait`.
- Child processes, two families:
  :class:`PipedChild` is one child the test *talks to* over a pipe (send, recv, expect);
  :class:`Children` starts functions in children and *collects what they return*.
- Child targets (module level, importable in a ``spawn`` child), an audit log, and
  the subprocess holders of the diagnostics tests (:class:`Holders`) and the CLI.
"""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import multiprocessing.synchronize
import os
import pickle
import queue
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grex_locks
from grex_locks import (
    BackendLock,
    LockBusy,
    LockError,
    ManifestLock,
    PackLock,
    Scheduler,
    Tier,
    WorkspaceBusy,
    WorkspaceLock,
    acquire_all,
)

if TYPE_CHECKING:
    import pytest

    from grex_locks._diagnostics.diagnosis import Diagnosis

# -- time bounds -------------------------------------------------------------------------------

#: The bound on every handshake with a thread, a child process or the kernel. Generous on
#: purpose: it only decides how long a broken test takes to fail.
DEADLINE = 10.0

#: A child or thread holding something for a test lets go on its own after this long, so
#: that a test which never tells it to release cannot hang the suite.
HOLD_BACKSTOP = 30.0

START_METHODS = ("spawn", "forkserver", "fork")

Json = dict[str, Any]
MpEvent = multiprocessing.synchronize.Event
MpBarrier = multiprocessing.synchronize.Barrier

# -- the lock kinds ----------------------------------------------------------------------------

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


#: Every file lock kind, so that one contract test body runs over all of them.
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

# -- observing what nothing signals ------------------------------------------------------------


def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Return once ``condition()`` holds; fail with ``what`` after ``timeout`` s.

    For state nothing signals (threads queued, a process blocked in the kernel,
    a process stopped): an observation with a deadline, not a sleep standing in
    for one. The pause is the test's, never the library's.
    """
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.002)


def flock_waiters(lock_file: Path) -> set[int]:
    """Pids that ``/proc/locks`` lists as blocked waiting for a flock on ``lock_file``."""
    inode = os.stat(lock_file).st_ino
    pids: set[int] = set()
    with open("/proc/locks") as table:
        for line in table:
            fields = line.split()
            # "N: -> FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
            waiting = len(fields) >= 7 and fields[1] == "->" and fields[2] == "FLOCK"
            if waiting and int(fields[6].rsplit(":", 1)[1]) == inode:
                pids.add(int(fields[5]))
    return pids


def wait_until_blocked(
    lock_files: Path | Iterable[Path], pid: int, timeout: float = DEADLINE
) -> None:
    """Return once process ``pid`` waits in the kernel for a flock on (any of) ``lock_files``.

    The kernel shows a blocked flock only in ``/proc/locks``, so this watches
    that table with a deadline: it observes the state the test needs.
    """
    files = [lock_files] if isinstance(lock_files, Path) else list(lock_files)
    until(
        lambda: any(pid in flock_waiters(f) for f in files),
        f"process {pid} to block on {[str(f) for f in files]}",
        timeout,
    )


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


def open_fd_count() -> int:
    """How many descriptors this process has open now, after collecting garbage.

    Collecting first keeps descriptors of unreachable objects left by earlier
    code (a lock object, a finished child's pipes) out of the count.
    """
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# -- what another process sees: the kernel lock and the owner record ---------------------------

#: util-linux ``flock(1)``, or None where it is not installed.
FLOCK = shutil.which("flock")

#: ``flock -n -E BUSY`` exits with this when the lock is held by someone else.
BUSY = 75


def flock_n(lock_file: Path) -> int:
    """util-linux ``flock -n`` in a separate process: 0 if it got the lock, :data:`BUSY` if held.

    The lock file is opened read-only and nothing is created (so it also works
    as a user who may not write the directory); a missing file exits 2.
    """
    assert FLOCK is not None, "util-linux flock(1) is not installed"
    script = f'exec 3<"$1" || exit 2; exec "$2" -n -E {BUSY} 3'
    return subprocess.run(
        ["sh", "-c", script, "sh", str(lock_file), FLOCK], check=False, timeout=DEADLINE
    ).returncode


def third_process_can_take(lock_file: Path) -> bool:
    """Whether a separate process gets ``lock_file`` at once (util-linux ``flock -n``)."""
    code = flock_n(lock_file)
    assert code in (0, BUSY), f"flock -n {lock_file} exited {code}"
    return code == 0


def record_file(lock_file: Path) -> Path:
    """Where the owner record of ``lock_file`` lives."""
    return lock_file.with_name(lock_file.name + grex_locks.OWNER_SUFFIX)


def record_bytes(lock_file: Path) -> bytes | None:
    """The raw bytes of ``lock_file``'s owner record as another process reads them.

    None when there is no regular file at the record path (none at all, a
    symlink, a directory, a FIFO): never follows a symlink, never blocks.
    """
    try:
        fd = os.open(record_file(lock_file), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def record_json(data: bytes | None) -> Json | None:
    """A record's bytes as a dict; None for no file, an empty or a whitespace-only one.

    (A released record is blanked in place: whitespace only means no record.)
    """
    if data is None or not data.strip():
        return None
    record: Json = json.loads(data)
    return record


def owner_record(lock_file: Path) -> Json | None:
    """The owner record beside ``lock_file`` as a dict; None when there is none."""
    return record_json(record_bytes(lock_file))


def holder_record(lock_file: Path) -> Json:
    """The owner record of a held ``lock_file``; fails the test when there is none."""
    record = owner_record(lock_file)
    assert record is not None, f"no owner record beside {lock_file}"
    return record


# -- threads -----------------------------------------------------------------------------------


def must_wait(event: threading.Event | MpEvent, what: str, timeout: float = DEADLINE) -> None:
    """Wait for ``event``; fail with ``what`` if it is not set within ``timeout``."""
    assert event.wait(timeout), f"timed out after {timeout} s waiting for {what}"


class InThread:
    """Run ``fn`` in a thread; :meth:`result` joins it (with a deadline) and returns or raises."""

    def __init__(self, fn: Callable[[], Any], name: str | None = None) -> None:
        self._fn = fn
        self._box: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._box["result"] = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed back by result()
            self._box["error"] = exc

    def result(self, timeout: float = DEADLINE) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"thread {self.thread.name} still running"
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("result")


Holdable = AbstractContextManager[Any] | Callable[[], AbstractContextManager[Any]]


class HeldInThread:
    """Something held by a helper thread of its own until :meth:`release` (or the ``with`` ends).

    ``held`` is a lock object (held as ``with lock``) or a function returning
    what to hold (``lambda: scheduler.acquire(timeout=DEADLINE)``). Returns once
    the thread holds it; an error taking it is raised here.
    """

    def __init__(self, held: Holdable, name: str | None = None) -> None:
        self._take: Callable[[], AbstractContextManager[Any]]
        if isinstance(held, AbstractContextManager):
            lock = held
            self._take = lambda: lock
        else:
            self._take = held
        self._taken = threading.Event()
        self._let_go = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name=name, daemon=True)
        self._thread.start()
        must_wait(self._taken, "a helper thread to take what it holds")
        if self._error is not None:
            self._thread.join(DEADLINE)
            raise self._error

    def _hold(self) -> None:
        try:
            with self._take():
                self._taken.set()
                self._let_go.wait(HOLD_BACKSTOP)
        except BaseException as exc:  # noqa: BLE001 - raised by __init__ or release()
            self._error = exc
            self._taken.set()

    def release(self) -> None:
        """Tell the thread to let go; wait for it (raising what it raised)."""
        self._let_go.set()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), f"thread {self._thread.name} still holding"
        if self._error is not None:
            raise self._error

    def __enter__(self) -> HeldInThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- child processes: a conversation over a pipe -----------------------------------------------


class ChildFailed(AssertionError):
    """The child process raised; its traceback is the message."""


def _piped_entry(
    target: Callable[..., None],
    conn: multiprocessing.connection.Connection,
    args: tuple[Any, ...],
) -> None:
    try:
        target(conn, *args)
    except BaseException:
        conn.send(("child-error", traceback.format_exc()))
        raise


class PipedChild:
    """One child process the test *talks to*: ``target(conn, *args)`` under start ``method``.

    For a conversation (hold, then release when told; report each step): the
    test uses :meth:`send`, :meth:`recv` and :meth:`expect` (every receive has a
    deadline), and may :meth:`kill` it. Leaving the ``with`` block kills a child
    still alive. To run functions and just collect their return values, see
    :class:`Children`. Uses a local ``multiprocessing.get_context``, never the
    global one.
    """

    def __init__(self, method: str, target: Callable[..., None], *args: Any) -> None:
        # Any: typeshed's BaseContext lacks Process, though every real context has it.
        ctx: Any = multiprocessing.get_context(method)
        self.conn, child_conn = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(
            target=_piped_entry, args=(target, child_conn, args), daemon=True
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

    def __enter__(self) -> PipedChild:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(DEADLINE)
        self.conn.close()
        if self.process.exitcode is not None:
            self.process.close()  # its sentinel pipe, now rather than at garbage collection


def hold_until_told(conn: multiprocessing.connection.Connection, lock: AnyLock) -> None:
    """A :class:`PipedChild` target: hold ``lock``; say ("held", pid); release when told.

    Says "released" after letting go (or after :data:`HOLD_BACKSTOP`).
    """
    with lock:
        conn.send(("held", os.getpid()))
        if conn.poll(HOLD_BACKSTOP):
            conn.recv()
    conn.send("released")


# -- child processes: run functions, collect what they return ----------------------------------


def _report(
    results: multiprocessing.queues.Queue[tuple[int, bool, Any]],
    index: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        outcome = target(*args)
    except BaseException:  # noqa: BLE001 - handed to the test as a failure
        results.put((index, False, traceback.format_exc()))
        return
    results.put((index, True, outcome))


class Children:
    """Start functions in child processes and *collect what they return* (no conversation).

    :meth:`start` runs ``target(*args)`` in a new child; :meth:`results` gives
    every return value in start order (a child that raised fails the test).
    Children that must meet the test part-way use :meth:`event` and
    :meth:`barrier`. Leaving the ``with`` block SIGKILLs any child still alive,
    so a failing test never leaves a lock holder behind. To talk to one child
    step by step, see :class:`PipedChild`.
    """

    def __init__(self, method: str = "spawn") -> None:
        self.ctx = multiprocessing.get_context(method)
        self._results: multiprocessing.queues.Queue[tuple[int, bool, Any]] = self.ctx.Queue()
        self.processes: list[BaseProcess] = []
        self._collected: dict[int, Any] = {}

    def start(self, target: Callable[..., Any], *args: Any) -> int:
        """Run ``target(*args)`` in a new child; return the child's pid."""
        index = len(self.processes)
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=_report, args=(self._results, index, target, args), daemon=True
        )
        process.start()
        self.processes.append(process)
        pid: int | None = process.pid
        assert pid is not None
        return pid

    def event(self) -> MpEvent:
        return self.ctx.Event()

    def barrier(self, parties: int) -> MpBarrier:
        return self.ctx.Barrier(parties)

    def results(self, timeout: float = DEADLINE) -> list[Any]:
        """What every child returned, in start order; a child that raised fails the test."""
        deadline = time.monotonic() + timeout
        while len(self._collected) < len(self.processes):
            left = deadline - time.monotonic()
            try:
                index, ok, outcome = self._results.get(timeout=max(left, 0.001))
            except queue.Empty:
                missing = [p.pid for i, p in enumerate(self.processes) if i not in self._collected]
                raise AssertionError(
                    f"children {missing} reported nothing in {timeout} s"
                ) from None
            if not ok:
                raise AssertionError(f"child {self.processes[index].pid} failed:\n{outcome}")
            self._collected[index] = outcome
        for process in self.processes:
            process.join(DEADLINE)
            assert process.exitcode == 0, f"child {process.pid} exited with {process.exitcode}"
        return [self._collected[i] for i in range(len(self.processes))]

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(DEADLINE)
        self._results.close()
        self._results.join_thread()


def run_in_child(target: Callable[..., Any], *args: Any, method: str = "fork") -> Any:
    """What ``target(*args)`` returns in one fresh child process."""
    with Children(method) as children:
        children.start(target, *args)
        (result,) = children.results()
    return result


def try_lock(lock: AnyLock) -> str:
    """``"acquired"`` or the class name of what ``lock.try_acquire()`` raised."""
    try:
        hold = lock.try_acquire()
    except LockBusy as exc:
        return type(exc).__name__
    hold.release()
    return "acquired"


def acquire_within(lock: AnyLock, timeout: float) -> str:
    """``"acquired"`` or the class name of what a blocking ``acquire(timeout=)`` raised."""
    try:
        hold = lock.acquire(timeout=timeout)
    except LockError as exc:
        return type(exc).__name__
    hold.release()
    return "acquired"


def try_in_child(lock: AnyLock, method: str = "fork") -> str:
    """What ``try_acquire`` on ``lock`` does in a fresh child process."""
    result: str = run_in_child(try_lock, lock, method=method)
    return result


def acquire_in_child(lock: AnyLock, timeout: float = DEADLINE, method: str = "fork") -> str:
    """What a blocking ``acquire(timeout=)`` on ``lock`` does in a fresh child process."""
    with Children(method) as children:
        children.start(acquire_within, lock, timeout)
        (result,) = children.results(timeout + DEADLINE)
    return str(result)


def wait_for_exit(pid: int, timeout: float = DEADLINE) -> int:
    """Reap the forked child ``pid``; its exit code (-N for signal N).

    A child still running after ``timeout`` is SIGKILLed (and reaped) and the test fails.
    """
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not readable:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"process {pid} still running after {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- an audit log: O_APPEND lines that record who was inside when ------------------------------


def audit(path: Path, line: str) -> None:
    """Append one line in a single ``write`` to an ``O_APPEND`` file (atomic in order)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_audit(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def max_inside(entries: Iterable[list[str]]) -> int:
    """From ``enter``/``exit`` audit lines: the most holders inside at once (asserting pairs)."""
    inside: set[str] = set()
    most = 0
    for entry in entries:
        what, who = entry[0], entry[1]
        if what == "enter":
            assert who not in inside, f"{who} entered twice"
            inside.add(who)
            most = max(most, len(inside))
        else:
            assert what == "exit"
            assert who in inside, f"{who} left without entering"
            inside.remove(who)
    assert not inside, f"never left: {inside}"
    return most


# -- child targets (for Children): workspace and backend ---------------------------------------


def attempt_sync(workspace: Path) -> list[tuple[str, str]]:
    """A second "sync": every way of taking the workspace lock; (error class, message) each."""
    lock = WorkspaceLock(workspace)
    outcomes: list[tuple[str, str]] = []
    attempts: list[Callable[[], Any]] = [
        lock.try_acquire,
        lambda: lock.acquire(timeout=HOLD_BACKSTOP),
        lock.acquire,
        lock.__enter__,
    ]
    for attempt in attempts:
        try:
            attempt()
        except LockError as exc:
            outcomes.append((type(exc).__name__, str(exc)))
        else:
            lock.release()
            outcomes.append(("acquired", ""))
    return outcomes


def fetch_repeatedly(dest: Path, log: Path, rounds: int, start: MpBarrier) -> int:
    """Fetch into ``dest`` ``rounds`` times under its BackendLock, wiping it each time."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    lock = BackendLock(dest)
    for n in range(rounds):
        with lock.acquire(timeout=DEADLINE):
            audit(log, f"enter {me}")
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            (dest / "HEAD").write_text(f"{me} {n}\n")
            audit(log, f"exit {me}")
    return os.getpid()


# -- child targets (for Children): manifest ----------------------------------------------------


def manifest_line(worker: str, seq: int) -> bytes:
    """One JSON line, padded so that writing it in pieces could tear it."""
    return (json.dumps({"worker": worker, "seq": seq, "pad": "x" * 500}) + "\n").encode()


def append_line(data: Path, line: bytes) -> None:
    """Append ``line`` in three ``write`` calls: only the lock keeps it whole."""
    fd = os.open(data, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        third = len(line) // 3
        for piece in (line[:third], line[third : 2 * third], line[2 * third :]):
            os.write(fd, piece)
    finally:
        os.close(fd)


def append_under_write(
    lock: ManifestLock, data: Path, worker: str, count: int, start: MpBarrier
) -> int:
    """Append ``count`` lines to ``data``, each under ``lock.write()``."""
    start.wait(DEADLINE)
    for seq in range(count):
        with lock.write(timeout=DEADLINE):
            append_line(data, manifest_line(worker, seq))
    return count


def check_whole_lines(text: bytes) -> int:
    """Assert ``text`` is nothing but whole JSON lines; return how many."""
    if not text:
        return 0
    assert text.endswith(b"\n"), f"a torn last line: {text[-80:]!r}"
    lines = text.split(b"\n")[:-1]
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"worker", "seq", "pad"}, line[:80]
    return len(lines)


def read_until(lock: ManifestLock, data: Path, stop: MpEvent | threading.Event) -> int:
    """Read ``data`` under ``lock.read()`` until ``stop``; every read must see whole lines.

    Returns how many reads were made (the last one after ``stop`` was set).
    """
    reads = 0
    while True:
        finished = stop.is_set()
        with lock.read(timeout=DEADLINE):
            text = data.read_bytes() if data.exists() else b""
        check_whole_lines(text)
        reads += 1
        if finished:
            return reads


def read_together(lock: ManifestLock, everyone_inside: MpBarrier) -> int:
    """Be inside ``lock.read()`` at the same moment as every other party of the barrier."""
    with lock.read(timeout=DEADLINE):
        everyone_inside.wait(DEADLINE)
        assert lock.held
    return os.getpid()


def try_read(lock: ManifestLock) -> str:
    """``"acquired"`` or the class name of what ``lock.read(timeout=0)`` raised."""
    try:
        hold = lock.read(timeout=0)
    except LockError as exc:
        return type(exc).__name__
    hold.release()
    return "acquired"


def read_then_note_exit(lock: ManifestLock, log: Path, held: MpEvent, release: MpEvent) -> int:
    """Hold ``lock.read()`` until ``release``; log ``reader-exit`` while still inside."""
    with lock.read(timeout=DEADLINE):
        held.set()
        release.wait(HOLD_BACKSTOP)
        audit(log, "reader-exit")
    return os.getpid()


# -- child targets (for Children): scheduler ---------------------------------------------------


def hold_permit(scheduler: Scheduler, held: MpEvent, release: MpEvent) -> str:
    """Hold a permit until ``release``; return its slot file."""
    with scheduler.acquire(timeout=DEADLINE) as permit:
        held.set()
        release.wait(HOLD_BACKSTOP)
        return str(permit.slot)


def hold_every_permit(parallel: int, slots_dir: Path, held: MpEvent, release: MpEvent) -> list[str]:
    """Hold all permits of ``Scheduler(parallel, slots_dir)`` until ``release``.

    The scheduler is built here, in the child (so the child records the bound
    of a fresh ``slots_dir``); one thread per permit, named ``holder-<n>``, as a
    pool would hold them. Returns the holder threads' names.
    """
    scheduler = Scheduler(parallel, slots_dir=slots_dir)
    taken = threading.Barrier(parallel + 1)

    def hold_one() -> None:
        with scheduler.acquire(timeout=DEADLINE):
            taken.wait(DEADLINE)
            release.wait(HOLD_BACKSTOP)

    threads = [threading.Thread(target=hold_one, name=f"holder-{n}") for n in range(parallel)]
    for thread in threads:
        thread.start()
    taken.wait(DEADLINE)
    held.set()
    for thread in threads:
        thread.join(HOLD_BACKSTOP + DEADLINE)
    return [thread.name for thread in threads]


def run_under_permits(scheduler: Scheduler, log: Path, rounds: int, start: MpBarrier) -> int:
    """Take a permit ``rounds`` times, logging enter/exit (and the slot) while holding it."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    for _ in range(rounds):
        with scheduler.acquire(timeout=DEADLINE) as permit:
            assert permit.slot is not None
            audit(log, f"enter {me} {permit.slot.name}")
            audit(log, f"exit {me} {permit.slot.name}")
    return rounds


def permit_in_pool(scheduler: Scheduler) -> tuple[int, str, int | None, str]:
    """In a pool worker: (pid, slot name, max_parallelism, what try_acquire did)."""
    try:
        permit = scheduler.try_acquire()
    except LockBusy:
        return os.getpid(), "", scheduler.max_parallelism, "LockBusy"
    with permit:
        assert permit.slot is not None
        return os.getpid(), permit.slot.name, scheduler.max_parallelism, "acquired"


# -- child targets: the whole chain ------------------------------------------------------------


FiveLocks = tuple[WorkspaceLock, Scheduler, PackLock, BackendLock, ManifestLock]


def hold_one_of_each(locks: FiveLocks, held: MpEvent, release: MpEvent) -> int:
    """Hold one lock of every tier, outer to inner, until ``release``."""
    workspace, scheduler, pack, backend, manifest = locks
    with (
        workspace,
        scheduler.acquire(timeout=DEADLINE),
        pack.acquire(timeout=DEADLINE),
        backend.acquire(timeout=DEADLINE),
        manifest.write(timeout=DEADLINE),
    ):
        held.set()
        release.wait(HOLD_BACKSTOP)
    return os.getpid()


@dataclass(frozen=True)
class Workspace:
    """What every pack operation of one sync shares (it pickles to pool workers)."""

    scheduler: Scheduler
    manifest: ManifestLock
    events: Path
    packs: Path
    repos: Path


def pack_operation(workspace: Workspace, tree: str, pack: str, op: int) -> dict[str, Any]:
    """One pack operation as a grex sync takes it: slot → pack → backend → manifest.

    Appends an event with the pack's start and end (``time.monotonic``, one
    clock for every process) under ``ManifestLock.write()``, and returns it.
    """
    pack_dir, dest = workspace.packs / pack, workspace.repos / pack
    with workspace.scheduler.acquire(timeout=DEADLINE) as permit:
        assert permit.slot is not None
        with (
            PackLock(pack_dir).acquire(timeout=DEADLINE),
            BackendLock(dest).acquire(timeout=DEADLINE),
        ):
            start = time.monotonic()
            # The "fetch": wipe and re-create the checkout, as a clone would.
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for n in range(100):
                (dest / f"object-{n}").write_text(f"{tree} {op} {n}\n")
            (dest / "HEAD").write_text(f"{tree} {op}\n")
            marker = pack_dir / "last-op"
            marker.write_text(f"{op}\n")
            assert marker.read_text() == f"{op}\n", "another operation wrote into this pack"
            end = time.monotonic()
            event = {
                "tree": tree,
                "pack": pack,
                "op": op,
                "pid": os.getpid(),
                "slot": permit.slot.name,
                "start": start,
                "end": end,
            }
            with workspace.manifest.write(timeout=DEADLINE), workspace.events.open("a") as log:
                log.write(json.dumps(event) + "\n")
    return event


# -- child targets: acquire_all ----------------------------------------------------------------


def acquire_all_repeatedly(locks: list[PackLock], log: Path, rounds: int, start: MpBarrier) -> int:
    """Take ``locks`` together ``rounds`` times, logging enter/exit while holding them."""
    start.wait(DEADLINE)
    me = f"pid-{os.getpid()}"
    for _ in range(rounds):
        with acquire_all(locks, timeout=DEADLINE):
            audit(log, f"enter {me}")
            audit(log, f"exit {me}")
    return rounds


# -- subprocess holders for the diagnostics and CLI tests --------------------------------------

#: A holder: lock argv[1] (``ex`` or ``sh`` per argv[2]); write a record per
#: argv[3] (``own``, ``wrong-start``, ``none``); with argv[4] == ``handoff``
#: start a grandchild that inherits the locked descriptor and print its pid;
#: print "ready"; live until stdin closes.
HOLDER = r"""
import fcntl, json, os, socket, subprocess, sys, time
import psutil
path, mode, record, extra = sys.argv[1:5]
fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH if mode == "sh" else fcntl.LOCK_EX)
if record != "none":
    rec = {"pid": os.getpid(), "create_time": psutil.Process().create_time(),
           "hostname": socket.gethostname(), "thread": "worker-3", "tier": 2,
           "acquired_at": time.time(), "argv": ["sync.py", "--all"]}
    if record == "wrong-start":
        rec["create_time"] -= 1000.0
    with open(path + ".owner", "w") as f:
        json.dump(rec, f)
if extra == "handoff":
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             pass_fds=(fd,))
    print(child.pid, flush=True)
print("ready", flush=True)
sys.stdin.read()
"""

#: Hold grex_locks.<argv[1]>(argv[2]) through the library; say "ready"; hold until stdin ends.
LIBRARY_HOLDER = r"""
import sys, grex_locks
with getattr(grex_locks, sys.argv[1])(sys.argv[2]):
    print("ready", flush=True)
    sys.stdin.read()
"""

#: Block waiting for an exclusive flock on argv[1], then report and exit.
WAITER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("waiting", flush=True)
fcntl.flock(fd, fcntl.LOCK_EX)
print("granted", flush=True)
"""


def read_line(proc: subprocess.Popen[bytes], timeout: float = DEADLINE) -> str:
    """The next line ``proc`` prints, failing the test if none comes within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"pid {proc.pid} printed nothing within {timeout} s"
    return proc.stdout.readline().decode().strip()


class Holders:
    """Spawns holder processes (plain ``subprocess``) and makes sure none outlives the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.strays: list[int] = []

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.procs.append(proc)
        return proc

    def hold(
        self, lock: Path, mode: str = "ex", record: str = "own", extra: str = "-"
    ) -> subprocess.Popen[bytes]:
        """A process holding ``lock``; returns once it holds it (and recorded itself)."""
        proc = self.spawn(sys.executable, "-c", HOLDER, str(lock), mode, record, extra)
        if extra == "handoff":
            self.strays.append(int(read_line(proc)))
        assert read_line(proc) == "ready"
        return proc

    def hold_with_library(
        self, kind: str, target: Path, *, as_user: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """A process holding ``grex_locks.<kind>(target)`` (its owner record written) until
        its stdin closes; ``as_user`` is a command prefix (``setpriv ...``) to run it as."""
        proc = self.spawn(*as_user, sys.executable, "-c", LIBRARY_HOLDER, kind, str(target))
        assert read_line(proc) == "ready"
        return proc

    def wait_for(self, lock: Path) -> subprocess.Popen[bytes]:
        """A process blocked in the kernel waiting for ``lock``."""
        proc = self.spawn(sys.executable, "-c", WAITER, str(lock))
        assert read_line(proc) == "waiting"
        wait_until_blocked(lock, proc.pid)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait(DEADLINE)

    def close(self) -> None:
        for pid in self.strays:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(DEADLINE)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def check_words(d: Diagnosis) -> None:
    """What every diagnosis must offer: JSON, pickling, one actionable paragraph.

    The paragraph never advises deleting a lock file: the only ``rm`` it may
    suggest is of something at an owner record path.
    """
    data = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert data["state"] == d.state.name
    assert {"path", "state", "owner", "holders"} <= data.keys()
    text = d.explain()
    assert text
    assert "\n" not in text
    assert "delete" not in text.lower()
    for removed in re.findall(r"`rm (\S+)`", text):
        assert removed.endswith(".owner"), text
    assert f"rm {d.path}`" not in text
    again = pickle.loads(pickle.dumps(d))  # noqa: S301 - our own bytes
    assert again.state is d.state
    assert again.holder_summary() == d.holder_summary()


# -- the command line --------------------------------------------------------------------------

#: ``grex-locks`` as a separate process.
CLI = [sys.executable, "-m", "grex_locks"]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``grex-locks ARGS`` run in this process: (status, stdout, stderr)."""
    from grex_locks._cli.main import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def spawn_cli(*args: str) -> subprocess.Popen[bytes]:
    """``grex-locks ARGS`` started as a separate process, every stream a pipe."""
    return subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Close ``proc``'s stdin, wait for it; its status and stderr."""
    if proc.stdin is not None:
        proc.stdin.close()
        proc.stdin = None
    _, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, err.decode()
