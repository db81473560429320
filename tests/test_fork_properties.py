"""Fork at random points; whatever the child does, the parent's locks and records stay intact.

The property test runs a *driver* process (:func:`driver_main`, in a fresh
interpreter that runs only the upper part of this file: no pytest, no
hypothesis, so a child's interpreter shutdown is a grex user's) that takes
a random set of locks — in its main thread by ``with`` and by ``acquire``,
and in helper threads that hold, wait at the in-process gate, wait in the
kernel, or are frozen part-way through an acquire or a release — and then
forks from its main thread. The forked
child runs a random sequence of actions on what it inherited (gc, dropping,
releasing, leaving ``with`` blocks, taking other locks that reuse the closed
descriptor numbers, trying the parent's locks) and ends in a random way (a
normal interpreter exit, ``sys.exit(0)``, ``raise SystemExit``, an uncaught
exception, ``os._exit``) — a real interpreter shutdown, finalizers included.

The test process itself is the third process: it checks with its own
``flock(2)`` on a fresh descriptor whether each lock is busy, and reads
every record file's bytes, before the fork, while the child lives, after it
ended, and after the parent let go. The child asks util-linux ``flock -n``
whether the locks it took are still held after it dropped its inherited
things.

The other tests: ``fork`` process pools and ``subprocess`` with
``preexec_fn`` under held locks, and the lifetime rule (a hold with no
reference left stays held; an unheld lock object closes its descriptors).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from support import (
    BUSY,
    DEADLINE,
    FLOCK,
    HOLD_BACKSTOP,
    Json,
    flock_n,
    flock_waiters,
    open_fd_count,
    owner_record,
    record_bytes,
    record_json,
    until,
)

import grex_locks
from grex_locks import (
    HolderState,
    LockBusy,
    ManifestLock,
    PackLock,
    Scheduler,
    WorkspaceLock,
    acquire_all,
)

#: A driver thread or child waiting to be told something gives up after this long.
DRIVER_BACKSTOP = 60.0
PYTHON = sys.executable


# -- helpers shared by both sides -----------------------------------------------------------


def kernel_busy(path: Path) -> bool:
    """Whether a process other than the lock's users finds ``path`` locked (exclusive try)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class LineIO:
    """JSON lines over two descriptors; every read has a deadline."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.buffer = b""

    def send(self, message: Json) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data) :]

    def recv(self, timeout: float = DEADLINE) -> Json:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.read_fd], [], [], max(0.0, left))
            if not readable:
                raise TimeoutError(f"nothing received within {timeout} s")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise EOFError("the other end closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: Json = json.loads(line)
        return message


def thread_lock_path(base: Path, index: int, kind: str) -> Path:
    """Where helper thread ``index``'s lock lives (the test pre-holds it for kernel waits)."""
    if kind == "pack":
        return base / f"t{index}" / grex_locks.PACK_LOCK_FILE_NAME
    return base / f"t{index}.manifest"


# -- the driver: runs in its own interpreter ------------------------------------------------

#: Thread name -> (pause point, reached, go on): that thread stops once at that point.
_PAUSES: dict[str, tuple[str, threading.Event, threading.Event]] = {}


def _maybe_pause(point: str) -> None:
    name = threading.current_thread().name
    entry = _PAUSES.get(name)
    if entry is not None and entry[0] == point:
        del _PAUSES[name]
        entry[1].set()
        entry[2].wait(DRIVER_BACKSTOP)


def _install_pauses() -> None:
    """Let a driver thread freeze inside an acquire or a release, at a chosen step."""
    from grex_locks._core import os_lock
    from grex_locks._core.owner_record import RecordFile

    write, blank, unlock = RecordFile.write, RecordFile.blank, os_lock.unlock

    def paused_write(self: RecordFile, tier: int, waiter: object = None) -> None:
        _maybe_pause("acquire_before_record")
        write(self, tier, waiter)

    def paused_blank(self: RecordFile) -> None:
        _maybe_pause("release_before_blank")
        blank(self)

    def paused_unlock(fd: int, path: Path) -> None:
        _maybe_pause("release_before_unlock")
        unlock(fd, path)
        _maybe_pause("release_after_unlock")

    setattr(RecordFile, "write", paused_write)  # noqa: B010 - test instrumentation
    setattr(RecordFile, "blank", paused_blank)  # noqa: B010
    setattr(os_lock, "unlock", paused_unlock)  # noqa: B010


def _waiting_inside_acquire(ident: int | None) -> bool:
    """Whether thread ``ident`` is blocked in a wait, somewhere inside a lock's acquire.

    Read from the thread's Python stack (no library internals): the innermost
    frame is a ``wait`` (an event, a condition) and an acquire is below it.
    """
    frame = sys._current_frames().get(ident or 0)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return bool(names & {"acquire", "read", "write"})


class Worker:
    """A driver thread that holds, waits for, or is part-way through one lock."""

    def __init__(self, index: int, spec: Json, env: Env) -> None:
        self.index = index
        self.kind: str = spec["kind"]
        self.state: str = spec["state"]
        self.timeout: float | None = DRIVER_BACKSTOP if spec["timeout"] else None
        self.name = f"holder-{index}"
        self.env = env
        self.path: Path | None = None
        self.lock: Any
        if self.kind == "permit":
            self.lock = env.scheduler
        else:
            self.path = thread_lock_path(env.base, index, self.kind)
            self.lock = (
                PackLock(self.path.parent) if self.kind == "pack" else ManifestLock(self.path)
            )
        self.hold: Any = None
        self.holding = threading.Event()
        self.release_now = threading.Event()
        self.reached = threading.Event()
        self.go_on = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    @property
    def shared(self) -> bool:
        return self.kind == "manifest_read"

    def _take(self) -> Any:
        if self.kind == "permit":
            permit = self.lock.acquire(timeout=self.timeout)
            self.path = Path(permit.slot)
            return permit
        if self.kind == "manifest_read":
            return self.lock.read(timeout=self.timeout)
        return self.lock.acquire(timeout=self.timeout)

    def _run(self) -> None:
        try:
            if self.state == "acquire_before_record":
                _PAUSES[self.name] = (self.state, self.reached, self.go_on)
            self.hold = self._take()
            self.holding.set()
            if self.state.startswith("release_"):
                _PAUSES[self.name] = (self.state, self.reached, self.go_on)
                hold, self.hold = self.hold, None
                hold.release()
                return
            self.release_now.wait(DRIVER_BACKSTOP)
            hold, self.hold = self.hold, None
            hold.release()
        except BaseException:  # noqa: BLE001 - reported to the test
            self.error = traceback.format_exc()
        finally:
            self.done.set()

    def start_and_settle(self) -> None:
        """Start, and return once the thread is in the state the scenario asks for."""
        if self.state == "blocked_gate":
            assert self.path is not None
            blocker = Blocker(self.index, self.kind, self.path)
            self.env.blockers.append(blocker)
            blocker.thread.start()
            assert blocker.holding.wait(DEADLINE), "the blocker never took its lock"
        self.thread.start()
        if self.state == "holding":
            assert self.holding.wait(DEADLINE) or self.error, "never held"
        elif self.state == "blocked_kernel":
            assert self.path is not None
            path = self.path
            until(lambda: os.getpid() in flock_waiters(path), f"{self.name} in flock")
        elif self.state == "blocked_gate":
            ident = self.thread.ident
            until(lambda: _waiting_inside_acquire(ident), f"{self.name} waiting at the gate")
        else:
            assert self.reached.wait(DEADLINE) or self.error, f"never paused at {self.state}"
        assert self.error is None, self.error

    def entry(self) -> Json:
        assert self.path is not None
        return {
            "path": str(self.path),
            "role": self.state if self.state != "holding" else "held",
            "shared": self.shared,
            "thread": self.name,
        }


class Blocker:
    """A driver thread holding a lock exclusively, so that a Worker waits for it at the gate."""

    def __init__(self, index: int, kind: str, path: Path) -> None:
        self.name = f"blocker-{index}"
        self.path = path
        self.lock = PackLock(path.parent) if kind == "pack" else ManifestLock(path)
        self.holding = threading.Event()
        self.release_now = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        try:
            with self.lock.acquire(timeout=DEADLINE):
                self.holding.set()
                self.release_now.wait(DRIVER_BACKSTOP)
        except BaseException:  # noqa: BLE001 - reported to the test
            self.error = traceback.format_exc()
            self.holding.set()


class Churn:
    """A driver thread taking and releasing its own lock as fast as it can."""

    def __init__(self, base: Path) -> None:
        self.lock = PackLock(base / "churn")
        self.stop = threading.Event()
        self.rounds = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock.acquire(timeout=DEADLINE):
                    self.rounds += 1
        except BaseException:  # noqa: BLE001 - reported to the test
            self.error = traceback.format_exc()


class Env:
    """Everything the driver holds for one scenario (inherited as a whole by the child)."""

    def __init__(self, scenario: Json) -> None:
        self.base = Path(scenario["dir"])
        self.scenario = scenario
        self.scheduler = Scheduler(6, slots_dir=self.base / "slots")
        self.main_holds: list[Any] = []
        self.entries: list[Json] = []
        self.objects: list[Any] = []
        self.workers: list[Worker] = []
        self.blockers: list[Blocker] = []
        self.churn: Churn | None = None
        self.idle = PackLock(self.base / "idle") if scenario["idle"] else None

    def take_main(self, withs: contextlib.ExitStack) -> None:
        main: Json = self.scenario["main"]
        plan: list[tuple[str, Any, str]] = []
        if main["ws"]:
            plan.append(("ws", WorkspaceLock(self.base / "ws"), main["ws"]))
        if main["permit"]:
            plan.append(("permit", self.scheduler, main["permit"]))
        if main["pack"]:
            plan.append(("pack", PackLock(self.base / "mainpack"), main["pack"]))
        if main["manifest"]:
            mode, how = main["manifest"]
            plan.append((f"manifest_{mode}", ManifestLock(self.base / "main.manifest"), how))
        for what, lock, how in plan:
            shared = what == "manifest_read"
            if what == "permit":
                hold = lock.acquire(timeout=DEADLINE)
                path = Path(hold.slot)
            else:
                self.objects.append(lock)
                hold = lock.read(timeout=DEADLINE) if shared else None
                path = lock.path
            if how == "with" and what not in ("permit", "manifest_read"):
                withs.enter_context(lock)
            elif how in ("with", "with_hold"):
                withs.enter_context(hold if hold is not None else lock.acquire(timeout=DEADLINE))
            else:
                self.main_holds.append(hold if hold is not None else lock.acquire())
            self.entries.append(
                {"path": str(path), "role": "held", "shared": shared, "thread": "MainThread"}
            )

    def start_threads(self) -> None:
        for index, spec in enumerate(self.scenario["threads"]):
            worker = Worker(index, spec, self)
            self.workers.append(worker)
            if worker.kind != "permit":
                self.objects.append(worker.lock)
            worker.start_and_settle()
            self.entries.append(worker.entry())
        for blocker in self.blockers:
            self.objects.append(blocker.lock)
            self.entries.append(
                {"path": str(blocker.path), "role": "held", "shared": False, "thread": blocker.name}
            )
        if self.scenario["churn"]:
            self.churn = Churn(self.base)
            self.objects.append(self.churn.lock)
            self.churn.thread.start()
            self.entries.append(
                {"path": str(self.churn.lock.path), "role": "churn", "shared": False, "thread": ""}
            )
        if self.idle is not None:
            self.objects.append(self.idle)
            self.entries.append(
                {"path": str(self.idle.path), "role": "idle", "shared": False, "thread": ""}
            )

    def unblock(self) -> Json:
        """Let every frozen or waiting thread go on; report who holds what now."""
        for worker in self.workers:
            worker.go_on.set()
        for blocker in self.blockers:
            blocker.release_now.set()
        late: list[Json] = []
        for worker in self.workers:
            if worker.state.startswith("release_"):
                assert worker.done.wait(DEADLINE), f"{worker.name} never finished its release"
            elif worker.state != "holding":
                assert worker.holding.wait(DEADLINE) or worker.error, f"{worker.name} never held"
                late.append(worker.entry())
            assert worker.error is None, worker.error
        for blocker in self.blockers:
            blocker.thread.join(DEADLINE)
            assert not blocker.thread.is_alive(), f"{blocker.name} still holds"
            assert blocker.error is None, blocker.error
        return {"late": late}

    def release_threads(self) -> None:
        for worker in self.workers:
            worker.release_now.set()
            worker.thread.join(DEADLINE)
            assert not worker.thread.is_alive(), f"{worker.name} never let go"
            assert worker.error is None, worker.error
        if self.churn is not None:
            self.churn.stop.set()
            self.churn.thread.join(DEADLINE)
            assert not self.churn.thread.is_alive(), "churn thread never stopped"
            assert self.churn.error is None, self.churn.error


def _outcome(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the outcome is what is reported
        return type(exc).__name__
    return "ok"


class ChildBoomError(Exception):
    """The exception a child raises to end by an uncaught exception."""


def _child_try_everything(env: Env, report: Json) -> None:
    """In a fresh thread of the child (no tiers held): try every inherited lock object."""
    tries: dict[str, str] = {}

    def body() -> None:
        for lock in env.objects:
            if lock.held:
                continue  # the child's own (an inherited idle object it took)
            try:
                hold = lock.try_acquire()
            except LockBusy as exc:
                tries[str(lock.path)] = type(exc).__name__
                continue
            tries[str(lock.path)] = "acquired"
            hold.release()
        try:
            permit = env.scheduler.try_acquire()
        except LockBusy:
            report["permit"] = "LockBusy"
        else:
            report["permit"] = str(permit.slot)
            permit.release()

    thread = threading.Thread(target=body, name="child-try")
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the child's try thread hung"
    report["tries"] = tries


class ChildState:
    """What the forked child works on: everything it inherited, and what it took itself."""

    def __init__(self, env: Env, withs: contextlib.ExitStack) -> None:
        self.env = env
        self.withs = withs
        self.report: Json = {"from": "child", "pid": os.getpid(), "outcomes": [], "new": []}
        self.new_group: Any = None


def _act_gc(child: ChildState) -> str:
    gc.collect()
    return "ok"


def _act_drop_holds(child: ChildState) -> str:
    child.env.main_holds.clear()
    for worker in child.env.workers:
        worker.hold = None
    return "ok"


def _act_drop_objects(child: ChildState) -> str:
    child.env.objects.clear()
    for worker in child.env.workers:
        worker.lock = None
    return "ok"


def _act_release_holds(child: ChildState) -> str:
    holds, child.env.main_holds = child.env.main_holds, []
    return ",".join(_outcome(hold.release) for hold in holds) or "none"


def _act_release_thread_holds(child: ChildState) -> str:
    results = []
    for worker in child.env.workers:
        hold, worker.hold = worker.hold, None
        if hold is not None:
            results.append(f"{type(hold).__name__}:{_outcome(hold.release)}")
    return ",".join(results) or "none"


def _act_leave_with(child: ChildState) -> str:
    return _outcome(child.withs.close)


def _act_release_lock(child: ChildState) -> str:
    objects = [lock for lock in child.env.objects if not lock.held]
    return ",".join(_outcome(lock.release) for lock in objects) or "none"


def _act_take_new(child: ChildState) -> str:
    if child.new_group is not None:
        return "skipped"
    env = child.env
    locks: list[Any] = [PackLock(env.base / f"new{k}") for k in range(env.scenario["new_count"])]
    if env.scenario["new_idle"] and env.idle is not None:
        locks.append(env.idle)  # an inherited object nobody held: fresh and unheld here
    child.new_group = acquire_all(locks, timeout=DEADLINE)
    child.report["new"] = [str(lock.path) for lock in locks]
    return "ok"


def _act_try_inherited(child: ChildState) -> str:
    _child_try_everything(child.env, child.report)
    return "ok"


CHILD_ACTIONS: dict[str, Callable[[ChildState], str]] = {
    "gc": _act_gc,
    "drop_holds": _act_drop_holds,
    "drop_objects": _act_drop_objects,
    "release_holds": _act_release_holds,
    "release_thread_holds": _act_release_thread_holds,
    "leave_with": _act_leave_with,
    "release_lock": _act_release_lock,
    "take_new": _act_take_new,
    "try_inherited": _act_try_inherited,
}


def _child_actions(env: Env, withs: contextlib.ExitStack, io: LineIO) -> None:
    """The forked child: act on what was inherited, report, wait for the test, end as told."""
    err = os.open(env.base / "child.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.close(err)
    child = ChildState(env, withs)
    report = child.report
    report["held_at_start"] = [bool(lock.held) for lock in env.objects]
    for action in env.scenario["actions"]:
        report["outcomes"].append([action, CHILD_ACTIONS[action](child)])
    # Ask util-linux flock whether the locks this child took are still held.
    report["flock_n"] = {path: flock_n(Path(path)) for path in report["new"]}
    group = child.new_group
    report["new_held"] = bool(group is not None and all(lock.held for lock in group.locks))
    io.send(report)
    io.recv(DRIVER_BACKSTOP)  # "go": the test has looked while this child lives
    end = env.scenario["exit"]
    if end == "sys_exit":
        sys.exit(0)
    if end == "raise_systemexit":
        raise SystemExit
    if end == "raise":
        raise ChildBoomError("the child ends by an uncaught exception")
    if end == "os_exit":
        os._exit(7)


def _run_scenario(scenario: Json, io: LineIO) -> str:
    env = Env(scenario)
    with contextlib.ExitStack() as withs:
        env.take_main(withs)
        env.start_threads()
        io.send({"from": "driver", "pid": os.getpid(), "entries": env.entries})
        assert io.recv(DRIVER_BACKSTOP)["op"] == "fork"
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child_actions(env, withs, io)
            return "child"
        _, status = os.waitpid(pid, 0)
        io.send({"from": "driver", "child_exit": os.waitstatus_to_exitcode(status)})
        assert io.recv(DRIVER_BACKSTOP)["op"] == "unblock"
        io.send({"from": "driver", **env.unblock()})
        assert io.recv(DRIVER_BACKSTOP)["op"] == "release"
        for hold in reversed(env.main_holds):
            hold.release()
    env.release_threads()
    io.send({"from": "driver", "released": True})
    return "parent"


def driver_main() -> None:
    """The driver process: run scenarios sent as JSON lines on stdin until told to quit."""
    grex_locks.set_tier_check("raise")
    _install_pauses()
    io = LineIO(0, 1)
    while True:
        try:
            message = io.recv(DRIVER_BACKSTOP * 10)
        except EOFError:
            return
        if message["op"] == "quit":
            return
        if _run_scenario(message["scenario"], io) == "child":
            return  # the forked child: fall off the end, a normal interpreter exit


# -- lifetime: a holder process ------------------------------------------------------------


def lifetime_main() -> None:
    """A fresh process: take locks and keep no reference to them; hold until stdin closes."""
    grex_locks.set_tier_check("off")  # many holds of one tier in one thread, on purpose
    base, count, what = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def take(n: int) -> None:
        PackLock(base / f"p{n}").acquire()

    def take_group(n: int) -> None:
        acquire_all([PackLock(base / f"g{n}a"), PackLock(base / f"g{n}b")])

    def take_permit(n: int) -> None:
        Scheduler(1, slots_dir=base / f"slots{n}").acquire()

    taker = {"pack": take, "group": take_group, "permit": take_permit}[what]
    for n in range(count):
        taker(n)
    gc.collect()
    gc.collect()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it


# == helper processes run this file up to here: no pytest, no hypothesis above this line ==

import pytest  # noqa: E402 - below the part that helper processes run
from hypothesis import HealthCheck, Phase, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: Runs the part of this file above the marker in a fresh interpreter, then ``entry()``:
#: a driver or holder process without pytest and hypothesis loaded (a forked child's
#: interpreter shutdown then costs what a grex user's would). This file's directory goes
#: on ``sys.path`` first, for ``support`` (which imports neither).
_MARKER = "# == helper processes run this file up to here"
_BOOT = (
    "import os, sys; path = sys.argv[1]; sys.path.insert(0, os.path.dirname(path)); "
    "source = open(path).read().split({marker!r})[0]; "
    "namespace = {{'__name__': '_fork_helper'}}; "
    "exec(compile(source, path, 'exec'), namespace); namespace[{entry!r}]()"
)
THIS_FILE = str(Path(__file__).resolve())


def boot(entry: str) -> list[str]:
    """The command line of a helper process that runs ``entry`` of this file's upper part."""
    return [PYTHON, "-c", _BOOT.format(marker=_MARKER, entry=entry), THIS_FILE]


# -- the test side of the property test -----------------------------------------------------


class Driver:
    """The driver process, seen from the test; restarted after any failure."""

    def __init__(self, workdir: Path) -> None:
        self.stderr_path = workdir / f"driver-{time.monotonic_ns()}.err"
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                boot("driver_main"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.io = LineIO(self.process.stdout.fileno(), self.process.stdin.fileno())

    def recv(self, timeout: float = DEADLINE) -> Json:
        try:
            return self.io.recv(timeout)
        except (TimeoutError, EOFError) as exc:
            raise AssertionError(f"driver: {exc}; its stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the driver and its forked child
        self.process.wait(DEADLINE)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def quit(self) -> None:
        with contextlib.suppress(OSError):
            self.io.send({"op": "quit"})
        try:
            self.process.wait(DEADLINE)
        finally:
            self.kill()


class DriverPool:
    """One driver for a whole hypothesis run; a fresh one after a failed example."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.driver: Driver | None = None

    def get(self) -> Driver:
        if self.driver is None or self.driver.process.poll() is not None:
            self.driver = Driver(self.workdir)
        return self.driver

    def discard(self) -> None:
        if self.driver is not None:
            self.driver.kill()
            self.driver = None

    def close(self) -> None:
        if self.driver is not None:
            self.driver.quit()
            self.driver = None


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriverPool]:
    pool = DriverPool(tmp_path_factory.mktemp("drivers"))
    yield pool
    pool.close()


#: Roles whose lock a third process must find busy while the child runs.
BUSY_ROLES = {
    "held",
    "blocked_kernel",
    "blocked_gate",
    "acquire_before_record",
    "release_before_blank",
    "release_before_unlock",
}
FREE_ROLES = {"release_after_unlock", "idle"}
EXIT_CODES = {"return": 0, "sys_exit": 0, "raise_systemexit": 0, "raise": 1, "os_exit": 7}


class Snapshot:
    """Which lock files a third process finds busy, and every record's bytes."""

    def __init__(self, entries: list[Json]) -> None:
        self.busy: dict[str, bool] = {}
        self.records: dict[str, bytes | None] = {}
        for entry in entries:
            if entry["role"] == "churn":
                continue
            path = Path(entry["path"])
            self.busy[entry["path"]] = kernel_busy(path)
            self.records[entry["path"]] = record_bytes(path)

    def assert_same(self, other: Snapshot, when: str, skip: frozenset[str] = frozenset()) -> None:
        for path, busy in self.busy.items():
            if path in skip:
                continue
            assert other.busy[path] == busy, (
                f"{when}: {path} was {'busy' if busy else 'free'} at the fork, "
                f"now {'busy' if other.busy[path] else 'free'}"
            )
            if busy:
                assert other.records[path] == self.records[path], (
                    f"{when}: the record of {path} changed:\n"
                    f"  at the fork: {self.records[path]!r}\n  now: {other.records[path]!r}"
                )


def check_entries_at_fork(entries: list[Json], snap: Snapshot, driver_pid: int) -> None:
    """Before the fork, the state is what the driver says it set up."""
    for entry in entries:
        role, path = entry["role"], entry["path"]
        if role == "churn":
            continue
        if role in BUSY_ROLES:
            assert snap.busy[path], f"{role} lock {path} is not busy before the fork"
        if role in FREE_ROLES:
            assert not snap.busy[path], f"{role} lock {path} is busy before the fork"
        record = record_json(snap.records[path])
        if role in ("held", "release_before_blank") and not entry["shared"]:
            assert record is not None, f"no record for {path} held by {entry['thread']}"
            assert record["pid"] == driver_pid, record
            assert record["thread"] == entry["thread"], record
        shared_hold = role == "held" and entry["shared"]
        if role in ("release_before_unlock", "release_after_unlock") or shared_hold:
            assert record is None, f"{role} {path}: a record is left: {record}"


def check_child_report(report: Json, snap: Snapshot) -> None:
    """What the child saw of its inherited objects."""
    assert not any(report["held_at_start"]), f"inherited objects held in the child: {report}"
    for action, outcome in report["outcomes"]:
        if action in ("release_holds", "leave_with"):
            assert set(outcome.split(",")) <= {"ok", "none"}, (action, outcome)
        elif action == "release_thread_holds":
            # A Hold taken by another parent thread: nothing. A Permit: see
            # test_releasing_a_permit_inherited_from_another_thread_does_nothing.
            for one in outcome.split(","):
                assert one in ("none", "Hold:ok", "Permit:ok", "Permit:RuntimeError"), outcome
        elif action == "release_lock":
            assert set(outcome.split(",")) <= {"RuntimeError", "none"}, (action, outcome)
    for path, outcome in report.get("tries", {}).items():
        if snap.busy.get(path):
            # Never held twice: what a third process finds busy, the child cannot take.
            assert outcome in ("LockBusy", "WorkspaceBusy"), (path, outcome)
    permit = report.get("permit")
    if permit not in (None, "LockBusy"):
        assert not snap.busy.get(permit, False), f"the child took the parent's slot {permit}"
    if report["new"]:
        assert report["new_held"], "the child's own locks are not held in the child"
        for path, code in report["flock_n"].items():
            assert code == BUSY, f"the child's own lock {path} is free for flock -n ({code})"


def _hold_outside(scenario: Json) -> list[int]:
    """Take, from this process, the locks the scenario's threads must wait for in the kernel."""
    base = Path(scenario["dir"])
    outside: list[int] = []
    for index, spec in enumerate(scenario["threads"]):
        if spec["state"] == "blocked_kernel":
            path = thread_lock_path(base, index, spec["kind"])
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            outside.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
    return outside


def _check_child_alive(report: Json, entries: list[Json], at_fork: Snapshot) -> None:
    check_child_report(report, at_fork)
    at_fork.assert_same(Snapshot(entries), "while the child lives", frozenset(report["new"]))
    for path in report["new"]:
        assert kernel_busy(Path(path)), f"the child's own lock {path} is free"
        record = owner_record(Path(path))
        assert record is not None, f"the child's own lock {path} has no record"
        assert record["pid"] == report["pid"], record


def _check_child_ended(
    scenario: Json, ended: Json, report: Json, entries: list[Json], at_fork: Snapshot
) -> None:
    expected = EXIT_CODES[scenario["exit"]]
    child_err = (Path(scenario["dir"]) / "child.err").read_text(errors="replace")
    assert ended.get("child_exit") == expected, (
        f"the child exited with {ended.get('child_exit')}, expected {expected}; "
        f"its stderr:\n{child_err}"
    )
    if scenario["exit"] == "raise":
        assert "ChildBoomError" in child_err, child_err
        assert child_err.count("Traceback") == 1, child_err
        child_err = child_err.split("Traceback (most recent call last)", 1)[0]
    assert child_err == "", f"the child wrote to stderr:\n{child_err}"
    at_fork.assert_same(Snapshot(entries), "after the child ended")
    for path in report["new"]:
        assert not kernel_busy(Path(path)), f"{path} still busy after its holder died"


def _check_unblocked(unblocked: Json, entries: list[Json], driver_pid: int) -> None:
    assert "late" in unblocked, unblocked
    late_paths = set()
    for entry in unblocked["late"]:
        path = Path(entry["path"])
        late_paths.add(entry["path"])
        assert kernel_busy(path), f"{path} not held by {entry['thread']} after it got it"
        record = owner_record(path)
        if entry["shared"]:
            assert record is None, record
        else:
            assert record is not None, f"no record for {path} taken by {entry['thread']}"
            assert (record["pid"], record["thread"]) == (driver_pid, entry["thread"])
    for entry in entries:
        if entry["role"].startswith("release_") and entry["path"] not in late_paths:
            path = Path(entry["path"])
            assert not kernel_busy(path), f"{path} still busy after its release finished"
            assert owner_record(path) is None


def _check_all_free(entries: list[Json]) -> None:
    for entry in entries:
        path = Path(entry["path"])
        assert not kernel_busy(path), f"{path} still busy after the parent let go"
        if entry["role"] != "idle":  # a child that took it and died leaves its record
            record = owner_record(path)
            assert record is None, f"{path}: a record is left after release: {record}"


def run_example(pool: DriverPool, scenario: Json) -> None:
    """One scenario, stage by stage: set up, fork, child acts, child ends, unblock, release."""
    outside: list[int] = []
    driver = pool.get()
    try:
        outside = _hold_outside(scenario)
        driver.io.send({"op": "scenario", "scenario": scenario})
        ready = driver.recv()
        assert "entries" in ready, ready
        entries: list[Json] = ready["entries"]
        at_fork = Snapshot(entries)
        check_entries_at_fork(entries, at_fork, ready["pid"])

        driver.io.send({"op": "fork"})
        report = driver.recv()
        child_err = (Path(scenario["dir"]) / "child.err").read_text(errors="replace")
        assert report.get("from") == "child", f"{report}; the child's stderr:\n{child_err}"
        _check_child_alive(report, entries, at_fork)

        driver.io.send({"op": "go"})
        _check_child_ended(scenario, driver.recv(), report, entries, at_fork)

        while outside:
            os.close(outside.pop())
        driver.io.send({"op": "unblock"})
        _check_unblocked(driver.recv(), entries, ready["pid"])

        driver.io.send({"op": "release"})
        released = driver.recv()
        assert released.get("released"), released
        _check_all_free(entries)
        for action, outcome in report["outcomes"]:
            event(f"child {action}: {outcome}")
        event(f"child exit: {scenario['exit']}")
        for spec in scenario["threads"]:
            event(f"thread {spec['kind']}: {spec['state']}")
    except BaseException:
        pool.discard()
        raise
    finally:
        for fd in outside:
            os.close(fd)


THREAD_STATES = (
    "holding",
    "blocked_kernel",
    "blocked_gate",
    "acquire_before_record",
    "release_before_blank",
    "release_before_unlock",
    "release_after_unlock",
)
PERMIT_STATES = ("holding", "release_before_blank", "release_before_unlock", "release_after_unlock")
#: In an order whose prefixes are the interesting cases (hypothesis shrinks a
#: permutation towards this order): issue 9's first case is take_new, then drops.
ACTIONS = (
    "take_new",
    "try_inherited",
    "release_lock",
    "release_thread_holds",
    "release_holds",
    "leave_with",
    "drop_holds",
    "gc",
    "drop_objects",
)


def _normalise(spec: Json) -> Json:
    # A shared hold writes no record: there is no record step to freeze it at.
    if spec["kind"] == "manifest_read" and spec["state"] in (
        "acquire_before_record",
        "release_before_blank",
    ):
        return {**spec, "state": "holding"}
    return spec


_thread_spec = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["pack", "manifest_write", "manifest_read"]),
            "state": st.sampled_from(THREAD_STATES),
            "timeout": st.booleans(),
        }
    ).map(_normalise),
    st.fixed_dictionaries(
        {
            "kind": st.just("permit"),
            "state": st.sampled_from(PERMIT_STATES),
            "timeout": st.booleans(),
        }
    ),
)

scenarios = st.fixed_dictionaries(
    {
        "main": st.fixed_dictionaries(
            {
                "ws": st.sampled_from([None, "with", "acquire"]),
                "permit": st.sampled_from([None, "with", "acquire"]),
                "pack": st.sampled_from([None, "with", "with_hold", "acquire"]),
                "manifest": st.one_of(
                    st.none(),
                    st.tuples(
                        st.sampled_from(["write", "read"]), st.sampled_from(["with", "acquire"])
                    ),
                ),
            }
        ),
        "threads": st.lists(_thread_spec, min_size=1, max_size=4),
        "churn": st.booleans(),
        "idle": st.booleans(),
        # At least three different actions, in a random order (a shrinkable list of
        # sampled actions would mostly try one or two).
        "actions": st.tuples(st.permutations(ACTIONS), st.integers(3, len(ACTIONS))).map(
            lambda drawn: list(drawn[0][: drawn[1]])
        ),
        "new_count": st.integers(1, 3),
        "new_idle": st.booleans(),
        "exit": st.sampled_from(sorted(EXIT_CODES)),
    }
)

#: Issue 9, case 1, as a scenario: the child's new locks reuse the descriptor numbers of
#: inherited holds, then the child drops, releases and collects them.
ISSUE_CASE_1: Json = {
    "main": {"ws": "with", "permit": "acquire", "pack": "acquire", "manifest": ["write", "with"]},
    "threads": [
        {"kind": "pack", "state": "holding", "timeout": False},
        {"kind": "permit", "state": "holding", "timeout": True},
    ],
    "churn": False,
    "idle": True,
    "actions": ["take_new", "drop_holds", "gc", "release_thread_holds", "leave_with", "gc"],
    "new_count": 3,
    "new_idle": True,
    "exit": "return",
}

#: Every thread state at least once, whatever hypothesis draws.
EVERY_STATE_A: Json = {
    "main": {"ws": "acquire", "permit": "with", "pack": "with_hold", "manifest": ["read", "with"]},
    "threads": [
        {"kind": "pack", "state": "blocked_kernel", "timeout": True},
        {"kind": "pack", "state": "acquire_before_record", "timeout": False},
        {"kind": "manifest_write", "state": "release_before_blank", "timeout": False},
        {"kind": "permit", "state": "release_before_unlock", "timeout": True},
    ],
    "churn": True,
    "idle": True,
    "actions": ["try_inherited", "release_lock", "take_new", "release_holds", "gc"],
    "new_count": 2,
    "new_idle": False,
    "exit": "sys_exit",
}
EVERY_STATE_B: Json = {
    "main": {"ws": None, "permit": "acquire", "pack": "with", "manifest": ["write", "acquire"]},
    "threads": [
        {"kind": "manifest_read", "state": "blocked_gate", "timeout": True},
        {"kind": "pack", "state": "release_after_unlock", "timeout": False},
        {"kind": "manifest_write", "state": "blocked_kernel", "timeout": False},
        {"kind": "permit", "state": "release_before_blank", "timeout": False},
    ],
    "churn": True,
    "idle": False,
    "actions": ["take_new", "leave_with", "release_thread_holds", "try_inherited", "drop_holds"],
    "new_count": 1,
    "new_idle": False,
    "exit": "raise",
}
EXPLICIT = (
    ISSUE_CASE_1,
    {**ISSUE_CASE_1, "exit": "os_exit", "actions": ["take_new", "release_holds", "gc"]},
    {**ISSUE_CASE_1, "exit": "raise_systemexit", "actions": ["take_new", "try_inherited"]},
    EVERY_STATE_A,
    EVERY_STATE_B,
)

_SETTINGS: dict[str, Any] = {
    # Every example costs a fork and a handful of processes: report a failing
    # example as drawn (its scenario is printed) rather than spend minutes shrinking it.
    "phases": [Phase.explicit, Phase.generate],
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def _explicit_examples(test: Callable[..., None]) -> Callable[..., None]:
    for scenario in reversed(EXPLICIT):
        test = example(scenario=scenario)(test)
    return test


@pytest.mark.timeout(300)
@settings(max_examples=10, **_SETTINGS)
@_explicit_examples
@given(scenario=scenarios)
def test_forked_child_never_touches_the_parents_locks(
    drivers: DriverPool, tmp_path_factory: pytest.TempPathFactory, scenario: Json
) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp(), prefix="fork-"))
    run_example(drivers, {**scenario, "dir": str(base)})


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=100, **_SETTINGS)
@given(scenario=scenarios)
def test_forked_child_never_touches_the_parents_locks_long(
    drivers: DriverPool, tmp_path_factory: pytest.TempPathFactory, scenario: Json
) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp(), prefix="fork-"))
    run_example(drivers, {**scenario, "dir": str(base)})


# -- fork pools and preexec_fn under held locks ---------------------------------------------

#: The held lock objects, reachable from a forked pool worker as inherited objects.
_INHERITED: list[Any] = []


def _pool_task(fresh_dir: str) -> Json:
    """In a ``fork`` pool worker: gc, poke the inherited objects, take a lock of its own."""
    gc.collect()
    seen: Json = {"pid": os.getpid()}
    seen["held"] = [lock.held for lock in _INHERITED]
    seen["release"] = [_outcome(lock.release) for lock in _INHERITED]
    seen["try"] = []
    for lock in _INHERITED:
        try:
            lock.try_acquire().release()
        except LockBusy as exc:
            seen["try"].append(type(exc).__name__)
        else:
            seen["try"].append("acquired")
    with PackLock(fresh_dir).acquire(timeout=DEADLINE):
        seen["own"] = flock_n(Path(fresh_dir) / grex_locks.PACK_LOCK_FILE_NAME)
    gc.collect()
    return seen


def _assert_held_by_me(paths: list[Path], records: dict[Path, bytes | None]) -> None:
    for path in paths:
        assert flock_n(path) == BUSY, f"{path} is free for a third process"
        assert record_bytes(path) == records[path], f"the record of {path} changed"
        record = record_json(records[path])
        assert record is not None
        assert (record["pid"], record["thread"]) == (os.getpid(), "MainThread")
        diagnosis = grex_locks.diagnose(path)
        assert diagnosis.state == HolderState.HELD, diagnosis.explain()
        assert diagnosis.owner is not None
        assert diagnosis.owner["pid"] == os.getpid()
        assert os.getpid() in {holder.pid for holder in diagnosis.holders}


@pytest.mark.timeout(60)
def test_fork_pool_under_held_locks_leaves_them_and_their_records(tmp_path: Path) -> None:
    workspace, pack = WorkspaceLock(tmp_path / "ws"), PackLock(tmp_path / "pack")
    scheduler = Scheduler(2, slots_dir=tmp_path / "slots")
    with workspace, scheduler.acquire(timeout=DEADLINE) as permit:
        hold = pack.acquire(timeout=DEADLINE)
        assert permit.slot is not None
        paths = [workspace.path, pack.path, permit.slot]
        records = {path: record_bytes(path) for path in paths}
        _INHERITED[:] = [workspace, pack]
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(3, mp_context=ctx) as pool:
                dirs = [str(tmp_path / f"own{n}") for n in range(6)]
                seen = list(pool.map(_pool_task, dirs, timeout=DEADLINE))
        finally:
            _INHERITED.clear()
        for worker in seen:
            assert worker["pid"] != os.getpid()
            assert worker["held"] == [False, False], worker
            assert worker["release"] == ["RuntimeError", "RuntimeError"], worker
            assert worker["try"] == ["WorkspaceBusy", "LockBusy"], worker
            assert worker["own"] == BUSY, worker
        gc.collect()
        _assert_held_by_me(paths, records)
        hold.release()
    for path in paths:
        assert flock_n(path) == 0, f"{path} still busy after release"
        assert owner_record(path) is None


@pytest.mark.timeout(60)
def test_subprocess_with_preexec_fn_under_held_locks(tmp_path: Path) -> None:
    workspace, pack = WorkspaceLock(tmp_path / "ws"), PackLock(tmp_path / "pack")
    with workspace, pack.acquire(timeout=DEADLINE):
        paths = [workspace.path, pack.path]
        records = {path: record_bytes(path) for path in paths}
        assert FLOCK is not None
        for path in paths:
            # The forked child (preexec_fn runs in it) execs flock -n on the held lock.
            done = subprocess.run(
                [FLOCK, "-n", "-E", str(BUSY), str(path), "true"],
                preexec_fn=gc.collect,
                check=False,
                timeout=DEADLINE,
            )
            assert done.returncode == BUSY
        subprocess.run(["true"], preexec_fn=lambda: None, check=True, timeout=DEADLINE)
        gc.collect()
        _assert_held_by_me(paths, records)
    for path in paths:
        assert flock_n(path) == 0
        assert owner_record(path) is None


def _hold_in_thread(take: Callable[[], Any], held: threading.Event, stop: threading.Event) -> Any:
    box: dict[str, Any] = {}

    def body() -> None:
        with take() as hold:
            box["hold"] = hold
            held.set()
            stop.wait(HOLD_BACKSTOP)

    thread = threading.Thread(target=body, name=f"holder-{len(threading.enumerate())}")
    thread.start()
    assert held.wait(DEADLINE), "the holding thread never took its lock"
    return thread, box["hold"]


@pytest.mark.timeout(60)
def test_releasing_holds_inherited_from_other_threads_does_nothing(tmp_path: Path) -> None:
    """In a child forked from the main thread, ``h.release()`` on a hold (a Hold, a Permit,
    a HeldGroup) that another parent thread took does nothing and raises nothing."""
    scheduler = Scheduler(1, slots_dir=tmp_path / "slots")
    pack, a, b = PackLock(tmp_path / "pack"), PackLock(tmp_path / "a"), PackLock(tmp_path / "b")
    stop = threading.Event()
    takers: dict[str, Callable[[], Any]] = {
        "Hold": lambda: pack.acquire(timeout=DEADLINE),
        "Permit": lambda: scheduler.acquire(timeout=DEADLINE),
        "HeldGroup": lambda: acquire_all([a, b], timeout=DEADLINE),
    }
    threads, holds = [], {}
    try:
        for name, take in takers.items():
            thread, holds[name] = _hold_in_thread(take, threading.Event(), stop)
            threads.append(thread)
        slot = holds["Permit"].slot
        paths = [pack.path, a.path, b.path, slot]
        records = {path: record_bytes(path) for path in paths}
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                outcomes = {name: _outcome(hold.release) for name, hold in holds.items()}
                os.write(write_fd, (json.dumps(outcomes) + "\n").encode())
            except BaseException:  # noqa: BLE001 - any failure is exit status 1
                code = 1
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            readable, _, _ = select.select([pipe], [], [], DEADLINE)
            assert readable, "the child reported nothing"
            outcomes = json.loads(pipe.readline() or "{}")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for path in paths:
            assert flock_n(path) == BUSY, f"{path} free after the child released its copy"
            assert record_bytes(path) == records[path], f"{path}: record changed"
        assert outcomes == {"Hold": "ok", "Permit": "ok", "HeldGroup": "ok"}
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)


# -- lifetime -------------------------------------------------------------------------------


def _lifetime_paths(base: Path, count: int, what: str) -> list[Path]:
    name = grex_locks.PACK_LOCK_FILE_NAME
    if what == "pack":
        return [base / f"p{n}" / name for n in range(count)]
    if what == "group":
        return [base / f"g{n}{x}" / name for n in range(count) for x in "ab"]
    return [base / f"slots{n}" / "slot-0.lock" for n in range(count)]


def _wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], DEADLINE)
    assert readable, "the holder never got ready"
    assert process.stdout.readline() == "ready\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["pack", "group", "permit"])
def test_a_hold_without_references_stays_held_until_exit(tmp_path: Path, what: str) -> None:
    """``def take(): PackLock(p).acquire()`` then gc: the lock is still held (so with
    ``acquire_all`` and a scheduler permit), and named by the holder's record."""
    count = 10
    process = subprocess.Popen(
        [*boot("lifetime_main"), str(tmp_path), str(count), what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    paths = _lifetime_paths(tmp_path, count, what)
    try:
        _wait_ready(process)
        free = [str(path.relative_to(tmp_path)) for path in paths if flock_n(path) != BUSY]
        assert not free, f"released by the garbage collector: {free}"
        for path in paths:
            record = owner_record(path)
            assert record is not None, f"{path}: no record"
            assert record["pid"] == process.pid
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(DEADLINE)
        assert process.stdout is not None
        process.stdout.close()
    assert process.returncode == 0
    assert all(flock_n(path) == 0 for path in paths), "still busy after the holder exited"


@pytest.mark.timeout(60)
def test_unheld_lock_objects_close_their_descriptors_when_collected(tmp_path: Path) -> None:
    warm = PackLock(tmp_path / "warm")
    with warm:
        pass
    del warm
    baseline = open_fd_count()
    for n in range(200):
        PackLock(tmp_path / f"never{n}")
    assert open_fd_count() == baseline, "200 never-held lock objects leaked descriptors"
    for n in range(200):
        lock = PackLock(tmp_path / f"used{n}")
        lock.acquire(timeout=DEADLINE).release()
        with lock:
            pass
    del lock
    assert open_fd_count() == baseline, "200 used-then-released lock objects leaked descriptors"
    for n in range(50):
        held = ManifestLock(tmp_path / f"m{n}.lock")
        with Scheduler(1, slots_dir=tmp_path / f"s{n}").acquire(), held.read(timeout=DEADLINE):
            pass
    del held
    assert open_fd_count() == baseline, "manifest locks and scheduler slots leaked descriptors"
