"""The whole chain as a grex sync takes it: slot → pack → backend → manifest, in a process pool."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import (
    DEADLINE,
    Children,
    Workspace,
    hold_one_of_each,
    must_wait,
    pack_operation,
)

from grex_locks import (
    BackendLock,
    LockBusy,
    ManifestLock,
    PackLock,
    Scheduler,
    Tier,
    TierViolation,
    WorkspaceLock,
    acquire_all,
)
from grex_locks._core import tiers

#: Three pack trees that share packs, as a grex workspace would have them.
TREES: dict[str, list[str]] = {
    "app": ["core", "utils", "net", "ui"],
    "tools": ["utils", "cli", "net"],
    "docs": ["core", "cli", "theme"],
}
PARALLEL = 3
ROUNDS = 4


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that contain one instant."""
    points = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
        # At a tie an end comes first: touching intervals do not overlap.
        key=lambda point: (point[0], point[1]),
    )
    most = inside = 0
    for _, step in points:
        inside += step
        most = max(most, inside)
    return most


@pytest.mark.parametrize(
    "method",
    # spawn starts a fresh interpreter per worker: 2.5-6.5 s here, so only in the full run.
    [pytest.param("spawn", marks=pytest.mark.slow), "fork"],
)
def test_a_pool_walking_three_trees_that_share_packs(tmp_path: Path, method: str) -> None:
    events = tmp_path / "events.jsonl"
    workspace = Workspace(
        scheduler=Scheduler(PARALLEL, slots_dir=tmp_path / "slots"),
        manifest=ManifestLock(tmp_path / ".grex.lock"),
        events=events,
        packs=tmp_path / "packs",
        repos=tmp_path / "repos",
    )
    op_ids = itertools.count()
    ctx = multiprocessing.get_context(method)
    futures: list[Future[dict[str, Any]]] = []
    with ProcessPoolExecutor(max_workers=8, mp_context=ctx) as pool:
        # Interleave the trees: operations on a shared pack arrive from all of them.
        for _ in range(ROUNDS):
            for position in range(max(len(packs) for packs in TREES.values())):
                for tree, packs in TREES.items():
                    if position < len(packs):
                        op = next(op_ids)
                        futures.append(
                            pool.submit(pack_operation, workspace, tree, packs[position], op)
                        )
        # Nothing deadlocked: every operation finishes.
        returned = [future.result(timeout=6 * DEADLINE) for future in futures]
    expected = ROUNDS * sum(len(packs) for packs in TREES.values())
    assert len(returned) == expected

    logged = [json.loads(line) for line in events.read_text().splitlines()]
    # Every event is present, once, and as the worker saw it.
    assert sorted(logged, key=lambda event: event["op"]) == returned
    assert [event["op"] for event in returned] == list(range(expected))
    assert len({event["pid"] for event in logged}) >= 2, "the pool ran in one process"

    # No two operations on one pack overlapped.
    by_pack: dict[str, list[dict[str, Any]]] = {}
    for event in logged:
        by_pack.setdefault(event["pack"], []).append(event)
    assert set(by_pack) == {name for packs in TREES.values() for name in packs}
    for name, pack_events in by_pack.items():
        pack_events.sort(key=lambda event: event["start"])
        for before, after in itertools.pairwise(pack_events):
            assert before["end"] <= after["start"], f"two operations on {name} overlapped"

    # At most PARALLEL operations at once, and never two on one slot.
    assert _max_overlap([(e["start"], e["end"]) for e in logged]) <= PARALLEL
    by_slot: dict[str, list[dict[str, Any]]] = {}
    for event in logged:
        by_slot.setdefault(event["slot"], []).append(event)
    assert set(by_slot) <= {f"slot-{n}.lock" for n in range(PARALLEL)}
    for slot, slot_events in by_slot.items():
        assert _max_overlap([(e["start"], e["end"]) for e in slot_events]) == 1, slot


# -- the order, checked before waiting ---------------------------------------------------------


def test_taking_any_two_in_reverse_order_is_a_tier_violation_before_waiting(
    tmp_path: Path,
) -> None:
    """Each lock is held by another process; asking for it from inside an inner tier never waits.

    Were the tier checked after waiting, every acquire here would block until
    its timeout and raise LockTimeout (or, for the workspace, WorkspaceBusy).
    """
    theirs: dict[Tier, Any] = {
        Tier.WORKSPACE_SYNC: WorkspaceLock(tmp_path / "ws"),
        Tier.SEMAPHORE: Scheduler(1, slots_dir=tmp_path / "slots"),
        Tier.PER_PACK: PackLock(tmp_path / "ws" / "pack"),
        Tier.BACKEND: BackendLock(tmp_path / "repos" / "pack"),
        Tier.MANIFEST: ManifestLock(tmp_path / "ws" / ".grex.lock"),
    }
    # Locks of each tier that nobody else holds, for this process to hold.
    ours: dict[Tier, Callable[[], Any]] = {
        Tier.WORKSPACE_SYNC: lambda: WorkspaceLock(tmp_path / "ws2").acquire(),
        Tier.SEMAPHORE: Scheduler(1).acquire,
        Tier.PER_PACK: lambda: PackLock(tmp_path / "ws2" / "pack").acquire(),
        Tier.BACKEND: lambda: BackendLock(tmp_path / "repos" / "other").acquire(),
        Tier.MANIFEST: lambda: ManifestLock(tmp_path / "ws2" / ".grex.lock").write(),
    }

    def ask(tier: Tier) -> None:
        lock = theirs[tier]
        if tier is Tier.MANIFEST:
            lock.read(timeout=DEADLINE)
        else:
            lock.acquire(timeout=DEADLINE)

    with Children("spawn") as children:
        held, release = children.event(), children.event()
        children.start(hold_one_of_each, tuple(theirs.values()), held, release)
        must_wait(held, "the other process to take all five")
        checked = 0
        for inner in Tier:
            for outer in Tier:
                if outer > inner:
                    continue
                with ours[inner]():
                    with pytest.raises(TierViolation) as caught:
                        ask(outer)
                    assert caught.value.held == inner
                    assert caught.value.requested == outer
                    assert tiers.held_tiers() == (inner,)
                checked += 1
        assert checked == 15
        # A group of one tier inside an inner one is refused the same way.
        with ours[Tier.MANIFEST](), pytest.raises(TierViolation):
            acquire_all([theirs[Tier.PER_PACK], PackLock(tmp_path / "ws2" / "pack")])
        # In the right order, each of them is simply busy.
        with pytest.raises(LockBusy):
            theirs[Tier.PER_PACK].try_acquire()
        release.set()
        children.results()
