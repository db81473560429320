"""Scenario: one KeyboardInterrupt at each line the library runs for an operation, in turn.

Usage: ``interrupt_each_place.py ROOT SCENARIO``. The operation (one acquire
and release, often against a rival holding the lock) is run again and again;
run number *k* raises ``KeyboardInterrupt`` at the *k*-th place where a
signal handler could run inside grex_locks, or in what grex_locks calls
(``threading``), from a trace function — the same exception a Ctrl-C raises
there, at every such place in turn rather than at random ones. The sweep
ends with the first run that finishes before its *k*-th place.

After each run the rival lets go and then, as a user would after Ctrl-C:
a lock object still held is released through ``release()``; the same
operation must then succeed within :data:`AGAIN_TIMEOUT` (an interrupted
wait must not leave a helper thread that a later wait takes over and that
never runs); and nothing may be left: no gate entry, no tier, no permit
counted, no diagnosis in progress, every lock file free for a new open file
description, no owner record content, no thread of an abandoned wait still
running. Prints one JSON line.
"""

from __future__ import annotations

import dis
import faulthandler
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from left_behind import files_left, force_free, kept_in_process

import grex_locks
from grex_locks import (
    LockBusy,
    LockError,
    ManifestLock,
    PackLock,
    Scheduler,
    acquire_all,
)
from grex_locks._core import slow_waits

LIBRARY = os.path.dirname(os.path.abspath(grex_locks.__file__))
#: A diagnosis only looks (it changes no lock) and runs thousands of lines:
#: it is one step of the sweep, interrupted before and after, not inside.
DIAGNOSTICS = os.path.join(LIBRARY, "_diagnostics")
HERE = os.path.abspath(__file__)
#: Every wait of this script (a rival's answer, a helper thread's end) has this deadline.
DEADLINE = 10.0
#: The retry after an interrupted run must be granted within this.
AGAIN_TIMEOUT = 5.0
#: The contended operation's own timeout: short, so that each run stays short.
SHORT = 0.005
#: The rival lets go of the lock once the retry waits for it, or after this long.
LET_GO_DEADLINE = 1.0
#: Where the main thread blocks when it waits for a lock.
WAITING = os.path.join(LIBRARY, "_core", "waiting.py")
#: How long a helper thread of an abandoned wait may outlive the rival's hold.
HELPER_DEADLINE = 2.0
MAX_FAILURES = 10
#: The main thread's signal mask, as it must stay.
MASK = signal.pthread_sigmask(signal.SIG_BLOCK, ())
#: Threads that wait in flock for an abandoned wait: they must be done
#: before the lock file is judged.
FLOCK_HELPER = "grex-locks-flock-wait"
#: Threads that watch a cancel event: they hold nothing, and linger a moment
#: (up to 0.25 s) after their wait; judged once, at the end.
CANCEL_WATCHER = "grex-locks-cancel-watch"

FOREIGN = """
import fcntl, os, sys
fd = None
for line in sys.stdin:
    words = line.split()
    if words[0] == "lock":
        fd = os.open(words[1], os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        os.close(fd)
    print("ok", flush=True)
"""


class Interrupter:
    """A trace function raising KeyboardInterrupt at the ``at``-th place a signal could land.

    CPython runs a signal handler only at some instructions: on entering a
    function, after a call returns, at a loop's jump back (its "eval
    breaker" checks). Raising at any other line (the implicit
    ``__exit__`` of a ``with`` block, say) would test what no Ctrl-C can
    do, so only those places count, in library frames and in the frames
    the library calls.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.where = ""

    def trace_calls(self, frame: FrameType, event: str, arg: object) -> Any:
        del arg
        if event != "call":
            return None
        caller: FrameType | None = frame
        while caller is not None:
            name = caller.f_code.co_filename
            if name.startswith(DIAGNOSTICS):
                return None
            if name.startswith(LIBRARY):
                frame.f_trace_opcodes = True
                return self.trace_opcodes
            if name == HERE:
                return None
            caller = caller.f_back
        return None

    def trace_opcodes(self, frame: FrameType, event: str, arg: object) -> Any:
        del arg
        if event == "line":
            # 3.13 honours the switch only once the frame runs (3.11 at its call).
            frame.f_trace_opcodes = True
        if event == "opcode" and frame.f_lasti in _signal_checkpoints(frame.f_code):
            self.seen += 1
            if self.seen == self.at:
                code = frame.f_code
                self.where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
                # A trace function that raises is switched off: one interrupt per run.
                raise KeyboardInterrupt
        return self.trace_opcodes


@functools.cache
def _signal_checkpoints(code: CodeType) -> frozenset[int]:
    """Offsets of the instructions before which CPython may run a signal handler."""
    places: set[int] = set()
    after_check = False
    for instruction in dis.get_instructions(code):
        if after_check:
            places.add(instruction.offset)
        after_check = instruction.opname in _CHECKING_BEFORE_NEXT
        # (Not JUMP_BACKWARD_NO_INTERRUPT, which closes a with block's exit path.)
        if instruction.opname == "JUMP_BACKWARD":
            places.add(int(instruction.argval))
    return frozenset(places)


#: Instructions after which CPython checks for a pending signal: a frame's
#: start, and calls (3.10's names too; not the intrinsic calls of 3.12+,
#: which check nothing).
_CHECKING_BEFORE_NEXT = frozenset(
    {"RESUME", "CALL", "CALL_KW", "CALL_FUNCTION_EX", "CALL_FUNCTION", "CALL_METHOD",
     "CALL_FUNCTION_KW"}
)  # fmt: skip


class Foreign:
    """Another process holding a lock file with a bare flock when told to."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", FOREIGN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.stdin = self.process.stdin
        self.fd = self.process.stdout.fileno()

    def _tell(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()
        answer = b""
        while not answer.endswith(b"\n"):
            ready, _, _ = select.select([self.fd], [], [], DEADLINE)
            chunk = os.read(self.fd, 64) if ready else b""
            if not chunk:
                raise TimeoutError("the foreign holder did not answer")
            answer += chunk

    def hold(self, path: Path) -> None:
        self._tell(f"lock {path}")

    def let_go(self) -> None:
        self._tell("unlock")


class RivalThread:
    """Another thread of this process holding a lock (through its own object) when told to."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.let_go_now = threading.Event()
        self.done = threading.Event()

    def hold(self, take: Callable[[], Any]) -> None:
        self.holding.clear()
        self.let_go_now.clear()
        self.done.clear()

        def run() -> None:
            held = take()
            self.holding.set()
            self.let_go_now.wait(DEADLINE)
            held.release()
            self.done.set()

        threading.Thread(target=run, daemon=True).start()
        if not self.holding.wait(DEADLINE):
            raise TimeoutError("the rival thread did not take its lock")

    def let_go(self) -> None:
        self.let_go_now.set()
        if not self.done.wait(DEADLINE):
            raise TimeoutError("the rival thread did not let go")


class Sweep:
    def __init__(self, root: Path, scenario: str) -> None:
        self.packs = [PackLock(root / "p0"), PackLock(root / "p1")]
        self.manifest = ManifestLock(root / "m.lock")
        self.scheduler = Scheduler(1, slots_dir=root / "slots")
        self.slot = root / "slots" / "slot-0.lock"
        self.files = [self.packs[0].path, self.packs[1].path, self.manifest.path, self.slot]
        self.foreign = Foreign()
        self.rival = RivalThread()
        self.scenario = scenario
        self.operation, self.rival_holds, self.again = self._scenario(scenario)

    def _scenario(
        self, name: str
    ) -> tuple[Callable[[], Any], Callable[[], None] | None, Callable[[], Any]]:
        """(the operation run under interruption, what the rival holds meanwhile, the retry)."""
        pack, other = self.packs
        foreign, rival = self.foreign, self.rival
        rival_pack = PackLock(pack.path.parent)
        rival_scheduler = Scheduler(1, slots_dir=self.slot.parent)
        table: dict[str, tuple[Callable[[], Any], Callable[[], None] | None, Callable[[], Any]]]
        table = {
            "pack": (pack.acquire, None, lambda: pack.acquire(timeout=AGAIN_TIMEOUT)),
            "pack-timeout": (
                lambda: pack.acquire(timeout=SHORT),
                lambda: foreign.hold(pack.path),
                lambda: pack.acquire(timeout=AGAIN_TIMEOUT),
            ),
            "pack-cancel": (
                lambda: pack.acquire(timeout=DEADLINE, cancel=_set_soon()),
                lambda: foreign.hold(pack.path),
                lambda: pack.acquire(timeout=AGAIN_TIMEOUT, cancel=threading.Event()),
            ),
            "pack-thread": (
                lambda: pack.acquire(timeout=SHORT),
                lambda: rival.hold(lambda: rival_pack.acquire(timeout=DEADLINE)),
                lambda: pack.acquire(timeout=AGAIN_TIMEOUT),
            ),
            "pack-busy": (pack.try_acquire, lambda: foreign.hold(pack.path), pack.try_acquire),
            "read-timeout": (
                lambda: self.manifest.read(timeout=SHORT),
                lambda: foreign.hold(self.manifest.path),
                lambda: self.manifest.read(timeout=AGAIN_TIMEOUT),
            ),
            "write": (
                self.manifest.write,
                None,
                lambda: self.manifest.write(timeout=AGAIN_TIMEOUT),
            ),
            "group-timeout": (
                lambda: acquire_all(self.packs, timeout=SHORT),
                lambda: foreign.hold(other.path),
                lambda: acquire_all(self.packs, timeout=AGAIN_TIMEOUT),
            ),
            "permit-timeout": (
                lambda: self.scheduler.acquire(timeout=SHORT),
                lambda: foreign.hold(self.slot),
                lambda: self.scheduler.acquire(timeout=AGAIN_TIMEOUT),
            ),
            "permit-thread": (
                lambda: self.scheduler.acquire(timeout=SHORT),
                lambda: rival.hold(lambda: rival_scheduler.acquire(timeout=DEADLINE)),
                lambda: self.scheduler.acquire(timeout=AGAIN_TIMEOUT),
            ),
        }
        return table[name]

    def let_go(self) -> None:
        if self.rival_holds is None:
            return
        if self.scenario.endswith("-thread"):
            self.rival.let_go()
        else:
            self.foreign.let_go()

    def run(self, at: int) -> tuple[bool, dict[str, Any] | None]:
        """Run number ``at``; (whether the interrupt was raised, a failure or None)."""
        if self.rival_holds is not None:
            self.rival_holds()
        interrupter = Interrupter(at)
        held: Any = None
        outcome = "done"
        phase = "acquire"
        sys.settrace(interrupter.trace_calls)
        try:
            held = self.operation()
            phase = "release"
            held.release()
        except KeyboardInterrupt:
            outcome = f"interrupted in {phase}"
        except LockError as exc:
            outcome = type(exc).__name__
        finally:
            sys.settrace(None)
        problems: list[str] = []
        if self.scenario == "pack-busy":
            problems += self._busy_names_the_holder()
            self.let_go()
        if phase == "release" and outcome != "done" and getattr(held, "_undo", None) is not None:
            # A permit or a group: release() again finishes an interrupted release.
            problems += _release_again(held)
        for lock in [*self.packs, self.manifest]:
            if lock.held:
                problems += _release_again(lock)
        problems += self._again()
        problems += self._left_behind()
        if not problems:
            return bool(interrupter.where), None
        self._recover()
        return True, {
            "at": at,
            "where": interrupter.where,
            "outcome": outcome,
            "problems": problems,
        }

    def _busy_names_the_holder(self) -> list[str]:
        """After an interrupted refusal, the next refusal still names the foreign holder."""
        try:
            self.packs[0].try_acquire().release()
        except LockBusy as exc:
            pids = [h.pid for h in exc.holder.holders] if exc.holder else []
            if self.foreign.process.pid not in pids:
                return [f"the next LockBusy does not name the holder: {exc}"]
            return []
        return ["the lock was granted while the foreign process held it"]

    def _again(self) -> list[str]:
        """The same operation once more: it must wait for the rival, then be granted.

        The retry starts while the rival still holds the lock, and the rival
        lets go once the retry is seen waiting: so the retry really waits,
        and takes over what the interrupted run left behind (a helper thread
        blocked in flock). A retry waiting for a helper that never runs is
        never woken, and fails.
        """
        letting_go = threading.Thread(target=self._let_go_once_waited_for, daemon=True)
        if self.rival_holds is not None and self.scenario != "pack-busy":
            letting_go.start()
        try:
            held = self.again()
        except LockError as exc:
            return [f"the same operation, once the rival let go, failed: {exc}"]
        except KeyboardInterrupt:
            return ["the retry was interrupted (tracing was not off)"]
        finally:
            if letting_go.ident is not None:
                letting_go.join(DEADLINE)
        held.release()
        return []

    def _let_go_once_waited_for(self) -> None:
        main = threading.main_thread().ident
        deadline = time.monotonic() + LET_GO_DEADLINE
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main or 0)
            if frame is not None and frame.f_code.co_filename == WAITING:
                break
            time.sleep(0.0005)  # polling what the main thread does; not a handshake
        self.let_go()

    def _left_behind(self) -> list[str]:
        return [*self._state_left(), *files_left(self.files)]

    def _state_left(self) -> list[str]:
        """What this process still keeps: places, tiers, threads, a changed signal mask."""
        found = _helpers_still_running()
        found += kept_in_process([*self.packs, self.manifest], self.scheduler)
        for thread in threading.enumerate():
            # Another one than the monitor (its start interrupted, so started
            # again) must end by itself: two would log every slow wait twice.
            if thread.name == "grex-locks-slow-waits" and _ran(thread):
                if thread.ident != slow_waits._monitor_ident[0]:
                    thread.join(HELPER_DEADLINE)
                if thread.is_alive() and thread.ident != slow_waits._monitor_ident[0]:
                    found.append("a second slow-wait monitor thread runs")
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()) != MASK:
            found.append(
                f"the main thread's signal mask is {signal.pthread_sigmask(signal.SIG_BLOCK, ())}"
            )
        return found

    def _recover(self) -> None:
        """Force everything free after a failure, so that later runs are judged afresh."""
        force_free(self.files, [lock._core for lock in [*self.packs, self.manifest]])


def _set_soon() -> threading.Event:
    """A cancel event that another thread sets a moment from now."""
    cancel = threading.Event()
    threading.Timer(SHORT, cancel.set).start()
    return cancel


def _release_again(held: Any) -> list[str]:
    try:
        held.release()
    except RuntimeError as exc:
        return [f"{held!r} is held but release() refuses: {exc}"]
    return []


def _ran(thread: threading.Thread) -> bool:
    """Whether ``thread`` began to run; read, never waited for.

    An interrupt inside ``Thread.start()`` can leave a thread that never
    runs (it holds nothing): joining it, or waiting for its start, would hang.
    """
    started = getattr(thread, "_started", None)
    return started is None or started.is_set()


def _helpers_still_running(name: str = FLOCK_HELPER) -> list[str]:
    found = []
    for thread in threading.enumerate():
        if thread.name != name or not _ran(thread):
            continue
        thread.join(HELPER_DEADLINE)
        if thread.is_alive():
            found.append(f"{thread.name} thread still running after {HELPER_DEADLINE} s")
    return found


def _opcode_events_arrive() -> bool:
    """Whether a trace function switched on as above gets opcode events (3.12.1 sends none)."""
    seen: list[int] = []

    def probe() -> int:
        return len(seen)

    def lines(frame: FrameType, event: str, arg: object) -> Any:
        del arg
        frame.f_trace_opcodes = True
        if event == "opcode":
            seen.append(frame.f_lasti)
        return lines

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        del arg
        if event == "call" and frame.f_code is probe.__code__:
            frame.f_trace_opcodes = True
            return lines
        return None

    sys.settrace(calls)
    try:
        probe()
    finally:
        sys.settrace(None)
    return bool(seen)


def main() -> None:
    root, scenario = Path(sys.argv[1]), sys.argv[2]
    if not _opcode_events_arrive():
        print(json.dumps({"unsupported": f"Python {sys.version.split()[0]} sends no opcode "
                          "events to sys.settrace's trace functions"}))  # fmt: skip
        return
    faulthandler.dump_traceback_later(240.0, exit=True)
    sweep = Sweep(root, scenario)
    failures: list[dict[str, Any]] = []
    at = 0
    while len(failures) < MAX_FAILURES:
        at += 1
        interrupted, failure = sweep.run(at)
        if failure is not None:
            failures.append(failure)
        if not interrupted:
            break
    watchers = _helpers_still_running(CANCEL_WATCHER)
    fresh = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys\nfor p in sys.argv[1:]:\n"
         "    fd = os.open(p, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "print('took all')", *(str(p) for p in sweep.files if p.exists())],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    print(json.dumps({"places": at - 1, "failures": failures, "watchers_left": watchers,
                      "fresh_process_took_all": fresh.stdout.strip() == "took all"}))  # fmt: skip
    os._exit(0)


if __name__ == "__main__":
    main()
