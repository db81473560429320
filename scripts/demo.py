"""A real demonstration of grex_locks: processes contend, then a person diagnoses who holds what.

Part 1 runs a process pool over overlapping pack trees, every pack operation
taking the whole chain (scheduler slot -> pack -> backend -> manifest write),
and proves from the manifest that no two operations were ever inside one
pack at once and that no more than the scheduler's bound ran at a time.

Part 2 leaves one worker stuck holding a pack (with another waiting behind
it), SIGKILLs a holder, and SIGKILLs ``grex-locks run`` so that its command
inherits the lock; then it shows ``who``, ``scan`` and ``doctor --prune`` on
that workspace, cleans everything up, and exits 0 only if every check held.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

from grex_locks import (
    BackendLock,
    HolderState,
    ManifestLock,
    PackLock,
    Scheduler,
    diagnose,
)

PARALLEL = 3
TREES = [[0, 1, 2, 3], [2, 3, 4], [3, 4, 5, 0], [1, 2, 5], [5, 4, 3, 2, 1, 0]]
ROUNDS = 3
DEADLINE = 30.0


def pack_operation(workspace: Path, pack: Path, scheduler: Scheduler) -> None:
    """One pack operation under the whole lock chain, recorded in the manifest."""
    manifest = ManifestLock(workspace / ".grex.lock")
    with (
        scheduler.acquire(timeout=DEADLINE),
        PackLock(pack).acquire(timeout=DEADLINE),
        BackendLock(pack / "repo").acquire(timeout=DEADLINE),
    ):
        started = time.monotonic()
        # Stand-in for a fetch: real work, long enough to overlap with others.
        (pack / "repo").mkdir(exist_ok=True)
        (pack / "repo" / f"fetched-by-{os.getpid()}").write_text("ok\n")
        time.sleep(0.004)
        ended = time.monotonic()
        with manifest.write(timeout=DEADLINE), open(workspace / "events.jsonl", "a") as log:
            event = {"pid": os.getpid(), "pack": pack.name, "start": started, "end": ended}
            log.write(json.dumps(event) + "\n")


def walk_tree(workspace: Path, packs: list[Path], scheduler: Scheduler) -> int:
    """A worker's job: every pack of one tree, ROUNDS times."""
    for _ in range(ROUNDS):
        for pack in packs:
            pack_operation(workspace, pack, scheduler)
    return len(packs) * ROUNDS


def check_events(workspace: Path, expected: int) -> bool:
    """No overlap on any pack, at most PARALLEL at once, and every event present."""
    events = [json.loads(line) for line in (workspace / "events.jsonl").read_text().splitlines()]
    by_pack: dict[str, list[dict[str, float]]] = defaultdict(list)
    for event in events:
        by_pack[event["pack"]].append(event)
    overlaps = 0
    for pack_events in by_pack.values():
        pack_events.sort(key=lambda e: e["start"])
        overlaps += sum(1 for a, b in pairwise(pack_events) if b["start"] < a["end"])
    edges = sorted([(e["start"], 1) for e in events] + [(e["end"], -1) for e in events])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    print(f"  events recorded: {len(events)} of {expected} operations")
    print(f"  operations that overlapped another on the same pack: {overlaps}")
    print(f"  most operations running at once: {peak} (scheduler bound {PARALLEL})")
    return len(events) == expected and overlaps == 0 and peak <= PARALLEL


def part_one(workspace: Path, packs: list[Path]) -> bool:
    print("== 1. a process pool walks overlapping pack trees through every lock")
    scheduler = Scheduler(PARALLEL, slots_dir=workspace / ".grex-slots")
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
        futures = [
            pool.submit(walk_tree, workspace, [packs[i] for i in tree], scheduler) for tree in TREES
        ]
        expected = sum(future.result(timeout=120) for future in futures)
    print(f"  {len(TREES)} trees over {len(packs)} packs, 4 worker processes, ", end="")
    print(f"{time.monotonic() - started:.1f} s")
    ok = check_events(workspace, expected)
    print("  verdict:", "no two workers were ever inside one pack at once" if ok else "VIOLATION")
    return ok


# -- part 2: stuck, killed and orphaned holders ------------------------------


def hold_until(pack: Path, ready: Connection, release: Event) -> None:
    """Hold ``pack`` until ``release`` is set (a worker that is stuck)."""
    with PackLock(pack):
        ready.send("held")
        release.wait(DEADLINE)


def wait_for_pack(pack: Path, ready: Connection) -> None:
    """Block behind the stuck worker, then take the pack once it lets go."""
    ready.send("waiting")
    with PackLock(pack).acquire(timeout=DEADLINE):
        pass


def hold_forever(pack: Path, ready: Connection) -> None:
    """Hold ``pack`` until killed (and so leave its owner record behind)."""
    PackLock(pack).acquire()
    ready.send("held")
    signal.pause()


def expect(pipe: Connection, word: str) -> None:
    """Wait (with a deadline) for a child's handshake ``word`` on ``pipe``."""
    if not pipe.poll(DEADLINE) or pipe.recv() != word:
        raise RuntimeError(f"a demo process did not report {word!r} in time")


def cli(*args: str) -> int:
    """Run ``grex-locks ARGS`` as a person would, showing its output."""
    print(f"\n$ grex-locks {' '.join(args)}", flush=True)
    return subprocess.run(
        [sys.executable, "-m", "grex_locks", *args], check=False, timeout=DEADLINE
    ).returncode


def await_waiter(lock_file: Path) -> bool:
    """Watch the kernel's lock table until a process is blocked waiting for ``lock_file``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if diagnose(lock_file).waiters:
            return True
        time.sleep(0.01)  # the waiter is another process; the kernel table is all we can watch
    return False


def part_two(workspace: Path, packs: list[Path]) -> bool:
    print("\n== 2. who holds what: a stuck worker, a killed one, an orphaned command")
    context = multiprocessing.get_context("spawn")
    stuck_pack, killed_pack, orphan_pack = packs[1], packs[2], packs[3]
    release = context.Event()
    ready_r, ready_w = context.Pipe(duplex=False)
    stuck = context.Process(target=hold_until, args=(stuck_pack, ready_w, release))
    waiter = context.Process(target=wait_for_pack, args=(stuck_pack, ready_w))
    doomed = context.Process(target=hold_forever, args=(killed_pack, ready_w))
    children = [stuck, waiter, doomed]
    orphan_cmd: subprocess.Popen[str] | None = None
    try:
        stuck.start()
        expect(ready_r, "held")
        waiter.start()
        expect(ready_r, "waiting")
        doomed.start()
        expect(ready_r, "held")
        os.kill(doomed.pid or 0, signal.SIGKILL)
        doomed.join(DEADLINE)

        # `run` holds the pack while its command runs; the command inherits the
        # lock, so when `run` itself is SIGKILLed the command keeps the pack.
        orphan_cmd = subprocess.Popen(
            [sys.executable, "-m", "grex_locks", "run", str(orphan_pack), "--",
             "sh", "-c", "echo started; exec sleep 60"],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        if orphan_cmd.stdout is None or orphan_cmd.stdout.readline() != "started\n":
            raise RuntimeError("grex-locks run did not start its command")
        os.kill(orphan_cmd.pid, signal.SIGKILL)
        orphan_cmd.wait(DEADLINE)

        waiting_seen = await_waiter(stuck_pack / ".grex-lock")
        cli("who", str(stuck_pack), str(killed_pack), str(orphan_pack), str(packs[4]))
        cli("scan", str(workspace))
        cli("doctor", str(workspace), "--prune")
        states = {
            name: diagnose(pack / ".grex-lock").state
            for name, pack in [("stuck", stuck_pack), ("killed", killed_pack), ("run", orphan_pack)]
        }
        print(f"\n  after doctor --prune: {', '.join(f'{k}={v.name}' for k, v in states.items())}")
        ok = waiting_seen and states == {
            "stuck": HolderState.HELD,
            "killed": HolderState.FREE,
            "run": HolderState.ORPHANED,
        }
    finally:
        release.set()
        if orphan_cmd is not None:
            # The orphaned `sleep` is in the session `run` started: end it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(orphan_cmd.pid, signal.SIGKILL)
        for child in children:
            child.join(DEADLINE)
            if child.is_alive():
                child.kill()
                child.join()
    print("  stuck worker released; the waiter behind it got the pack and finished")
    return ok


def main() -> int:
    workspace = Path(tempfile.mkdtemp(prefix="grex-locks-demo-"))
    try:
        packs = [workspace / "packs" / f"pack-{i}" for i in range(6)]
        for pack in packs:
            pack.mkdir(parents=True)
        ok = part_one(workspace, packs)
        ok = part_two(workspace, packs) and ok
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    print("\ndemo", "passed" if ok else "FAILED", "- workspace cleaned up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
