"""A slots directory has one bound, whatever count each process passes (issue 10, item 9)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from support import DEADLINE, Children, MpBarrier, hold_every_permit, must_wait

from grex_locks import LockBusy, LockIOError, Scheduler
from grex_locks.scheduler import BOUND_FILE_NAME

# -- child targets -------------------------------------------------------------------------------


def construct(parallel: int, slots_dir: Path, start: MpBarrier | None = None) -> str:
    """``"ok"``, or the ``ValueError`` that ``Scheduler(parallel, slots_dir=...)`` raised."""
    if start is not None:
        start.wait(DEADLINE)
    try:
        Scheduler(parallel, slots_dir=slots_dir)
    except ValueError as exc:
        return f"refused: {exc}"
    return "ok"


# -- one bound per directory ---------------------------------------------------------------------


def test_another_count_on_the_same_slots_dir_is_refused_in_another_process(
    tmp_path: Path,
) -> None:
    slots = tmp_path / "slots"
    Scheduler(2, slots_dir=slots)
    with Children("spawn") as children:
        children.start(construct, 4, slots)
        children.start(construct, 2, slots)
        refused, accepted = children.results()
    assert accepted == "ok"
    assert refused.startswith("refused: ")
    # The message names the directory, both counts and the fix.
    assert str(slots) in refused
    assert "Scheduler(4," in refused
    assert "bounded to 2 permits" in refused
    assert "pass parallel=2" in refused
    assert "another slots_dir" in refused


def test_two_and_four_next_to_each_other_never_let_four_permits_out(tmp_path: Path) -> None:
    """Another process holds both permits of Scheduler(2): Scheduler(4) is refused."""
    slots = tmp_path / "slots"
    with Children("spawn") as children:
        held, release = children.event(), children.event()
        children.start(hold_every_permit, 2, slots, held, release)
        must_wait(held, "the other process to hold both permits")
        with pytest.raises(ValueError, match="bounded to 2 permits"):
            Scheduler(4, slots_dir=slots)
        with pytest.raises(LockBusy):
            Scheduler(2, slots_dir=slots).try_acquire()
        assert sorted(p.name for p in slots.glob("slot-*.lock")) == ["slot-0.lock", "slot-1.lock"]
        release.set()
        assert children.results() == [["holder-0", "holder-1"]]


def test_processes_racing_to_record_a_bound_agree_on_one(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    counts = [2, 4, 2, 4, 2, 4]
    with Children("spawn") as children:
        start = children.barrier(len(counts))
        for count in counts:
            children.start(construct, count, slots, start)
        outcomes = children.results(timeout=4 * DEADLINE)
    recorded = json.loads((slots / BOUND_FILE_NAME).read_text())["parallel"]
    assert recorded in (2, 4)
    for count, outcome in zip(counts, outcomes, strict=True):
        assert (outcome == "ok") == (count == recorded), (count, outcome)
    # No private file of a process that lost the race is left behind.
    assert sorted(p.name for p in slots.iterdir()) == [
        BOUND_FILE_NAME,
        *(f"slot-{n}.lock" for n in range(recorded)),
    ]


def test_the_record_is_readable_by_everyone_and_never_rewritten(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    previous = os.umask(0o077)
    try:
        Scheduler(3, slots_dir=slots)
    finally:
        os.umask(previous)
    record = slots / BOUND_FILE_NAME
    before = record.stat()
    assert stat.S_IMODE(before.st_mode) == 0o644
    assert json.loads(record.read_text()) == {"parallel": 3}
    Scheduler(3, slots_dir=slots)
    with pytest.raises(ValueError, match="bounded to 3"):
        Scheduler(5, slots_dir=slots)
    after = record.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def test_unbounded_is_a_bound_too(tmp_path: Path) -> None:
    """``Scheduler(0, slots_dir=d)`` beside ``Scheduler(2, slots_dir=d)`` would bound nothing."""
    slots = tmp_path / "slots"
    assert Scheduler(0, slots_dir=slots).max_parallelism is None
    with pytest.raises(ValueError, match=r"unbounded \(0\)"):
        Scheduler(2, slots_dir=slots)
    other = tmp_path / "other"
    Scheduler(2, slots_dir=other)
    with pytest.raises(ValueError, match="bounded to 2"):
        Scheduler(0, slots_dir=other)


# -- what sits at the record's path --------------------------------------------------------------


def test_a_symlink_at_the_record_is_never_followed(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"parallel": 2}\n')
    (slots / BOUND_FILE_NAME).symlink_to(elsewhere)
    with pytest.raises(LockIOError, match="symlink") as caught:
        Scheduler(2, slots_dir=slots)
    assert isinstance(caught.value.__cause__, OSError)
    # A dangling one is not written through either.
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    target = tmp_path / "target.json"
    (dangling / BOUND_FILE_NAME).symlink_to(target)
    with pytest.raises(LockIOError, match="symlink"):
        Scheduler(2, slots_dir=dangling)
    assert not target.exists()
    assert elsewhere.read_text() == '{"parallel": 2}\n'


@pytest.mark.parametrize("content", [b"", b"garbage", b'{"parallel": -1}', b'{"parallel": "2"}'])
def test_a_malformed_record_is_refused_with_its_path(tmp_path: Path, content: bytes) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    (slots / BOUND_FILE_NAME).write_bytes(content)
    with pytest.raises(LockIOError) as caught:
        Scheduler(2, slots_dir=slots)
    assert str(slots / BOUND_FILE_NAME) in str(caught.value)
    assert (slots / BOUND_FILE_NAME).read_bytes() == content


def test_a_directory_at_the_record_is_refused(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    (slots / BOUND_FILE_NAME).mkdir(parents=True)
    with pytest.raises(LockIOError, match=BOUND_FILE_NAME):
        Scheduler(2, slots_dir=slots)
