"""Scheduler waits: one fair line per process, one kernel wait per slot, errors that name holders.

Also the scheduler's face of fork, Ctrl-C and lifetime: a forked child holds
no permits, an interrupted wait leaves nothing behind, and a permit nobody
references stays held.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import pickle
import select
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from support import (
    DEADLINE,
    Children,
    HeldInThread,
    InThread,
    MpEvent,
    flock_waiters,
    hold_every_permit,
    must_wait,
    until,
    wait_for_exit,
)

import grex_locks._holder_errors as holder_errors
import grex_locks.scheduler as scheduler_module
from grex_locks import LockBusy, LockCancelled, LockTimeout, Permit, Scheduler
from grex_locks.scheduler import PermitsBusy, PermitTimeout, SchedulerStatistics


def slot_files(slots: Path, count: int) -> list[Path]:
    return [slots / f"slot-{n}.lock" for n in range(count)]


def helper_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "grex-locks-flock-wait")


def a_permit(scheduler: Scheduler) -> Callable[[], Permit]:
    """What :class:`~support.HeldInThread` takes to hold a permit of ``scheduler``."""
    return functools.partial(scheduler.acquire, timeout=DEADLINE)


# -- child targets -------------------------------------------------------------------------------


def drop_a_permit(slots: Path, dropped: MpEvent, finish: MpEvent) -> int:
    """Take a permit and drop every reference to it; live on until ``finish``."""
    scheduler = Scheduler(1, slots_dir=slots)

    def take_and_forget() -> None:
        scheduler.acquire(timeout=DEADLINE)

    worker = threading.Thread(target=take_and_forget)
    worker.start()
    worker.join(DEADLINE)
    gc.collect()
    permits = scheduler.statistics().permits_out
    dropped.set()
    finish.wait(3 * DEADLINE)
    return permits


@pytest.fixture
def all_slots_held_elsewhere(tmp_path: Path) -> Iterator[tuple[Scheduler, int, Path]]:
    """A ``Scheduler(3, slots_dir)`` whose every slot another process holds: (it, pid, slots)."""
    slots = tmp_path / "slots"
    with Children("spawn") as children:
        held, release = children.event(), children.event()
        pid = children.start(hold_every_permit, 3, slots, held, release)
        must_wait(held, "the other process to take every slot")
        try:
            yield Scheduler(3, slots_dir=slots), pid, slots
        finally:
            release.set()
        assert children.results() == [["holder-0", "holder-1", "holder-2"]]


# -- errors name the holders, and cost nothing until read ----------------------------------------


def test_refusals_name_every_slots_holder(
    all_slots_held_elsewhere: tuple[Scheduler, int, Path],
) -> None:
    scheduler, pid, slots = all_slots_held_elsewhere
    with pytest.raises(PermitsBusy) as busy:
        scheduler.try_acquire()
    with pytest.raises(PermitTimeout) as timed_out:
        scheduler.acquire(timeout=0.05)
    errors: list[PermitsBusy | PermitTimeout] = [busy.value, timed_out.value]
    for error in errors:
        text = str(error)
        assert error.path == slots
        assert f"all 3 permits of {scheduler}" in text or "(all 3 in use)" in text
        for n in range(3):
            assert f"slot-{n}.lock held by pid {pid} (" in text, text
        assert {f"holder-{n}" for n in range(3)} <= {word.strip(",;") for word in text.split()}, (
            text
        )
        assert " for " in text
        assert [d.recorded("pid") if d else None for d in error.holders] == [pid] * 3
        assert error.holder is error.holders[0]
    assert timed_out.value.waited >= 0.05
    # Errors cross process boundaries whole.
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - bytes we just made
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert [d.recorded("pid") if d else None for d in copy.holders] == [pid] * 3


def test_refusals_diagnose_only_when_read(
    all_slots_held_elsewhere: tuple[Scheduler, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Internal attempts raise nothing costly: no diagnosis until someone reads the error."""
    scheduler, pid, _ = all_slots_held_elsewhere
    diagnosed: list[Path] = []
    real = holder_errors.holder_of

    def counting(path: Path, key: tuple[int, int]) -> Any:
        diagnosed.append(path)
        return real(path, key)

    monkeypatch.setattr(scheduler_module, "holder_of", counting)
    errors: list[PermitsBusy | PermitTimeout] = []
    for _ in range(20):
        with pytest.raises(PermitsBusy) as busy:
            scheduler.try_acquire()
        errors.append(busy.value)
    with pytest.raises(PermitTimeout) as timed_out:
        scheduler.acquire(timeout=0.02)
    errors.append(timed_out.value)
    assert diagnosed == []
    assert f"pid {pid}" in str(errors[0])
    assert len(diagnosed) == 3
    assert str(errors[0]) == str(errors[0])
    assert len(diagnosed) == 3


def test_an_in_process_refusal_names_the_threads_holding_permits() -> None:
    scheduler = Scheduler(2)
    holders = [HeldInThread(a_permit(scheduler), f"local-holder-{n}") for n in range(2)]
    try:
        with pytest.raises(LockBusy, match="local-holder-0") as busy:
            scheduler.try_acquire()
        assert "local-holder-1" in str(busy.value)
        with pytest.raises(LockTimeout, match="local-holder-1"):
            scheduler.acquire(timeout=0.01)
    finally:
        for holder in holders:
            holder.release()


# -- one line, one kernel wait per slot ----------------------------------------------------------


def test_many_waiting_threads_share_one_kernel_wait_per_slot(
    all_slots_held_elsewhere: tuple[Scheduler, int, Path],
) -> None:
    scheduler, _, slots = all_slots_held_elsewhere
    threads_before = helper_threads()
    cancel = threading.Event()
    waiters = [
        InThread(lambda: scheduler.acquire(timeout=DEADLINE, cancel=cancel)) for _ in range(12)
    ]
    until(
        lambda: scheduler.statistics() == SchedulerStatistics(3, 0, 12, 3),
        "12 threads in line, the head waiting in the kernel on 3 slots",
    )
    assert helper_threads() - threads_before <= 3
    for slot in slot_files(slots, 3):
        assert os.getpid() in flock_waiters(slot)
    cancel.set()
    for waiter in waiters:
        with pytest.raises(LockCancelled):
            waiter.result()
    assert scheduler.statistics() == SchedulerStatistics(3, 0, 0, 0)
    # A second crowd takes over the kernel waits the first left behind.
    waiters = [InThread(lambda: scheduler.acquire(timeout=0.3)) for _ in range(12)]
    for waiter in waiters:
        with pytest.raises(LockTimeout):
            waiter.result()
    assert helper_threads() - threads_before <= 3


def test_threads_are_served_first_in_first_out(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(1, slots_dir=slots)
    served: list[str] = []

    def take(name: str) -> None:
        with scheduler.acquire(timeout=DEADLINE):
            served.append(name)

    def in_line(count: int) -> Callable[[], bool]:
        return lambda: scheduler.statistics().threads_waiting == count

    with Children("spawn") as children:
        held, release = children.event(), children.event()
        children.start(hold_every_permit, 1, slots, held, release)
        must_wait(held, "the other process to take the slot")
        names = [f"waiter-{n}" for n in range(6)]
        waiters = []
        for n, name in enumerate(names):
            waiters.append(InThread(functools.partial(take, name), name=name))
            until(in_line(n + 1), f"{name} in line")
        release.set()
        for waiter in waiters:
            waiter.result()
        children.results()
    assert served == names


def test_statistics_count_permits_and_waiters(slots_dir: Path | None) -> None:
    scheduler = Scheduler(2, slots_dir=slots_dir)
    assert scheduler.statistics() == SchedulerStatistics(2, 0, 0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheduler.statistics().permits_out = 5  # type: ignore[misc]
    first = HeldInThread(a_permit(scheduler))
    assert scheduler.statistics().permits_out == 1
    second = HeldInThread(a_permit(scheduler))
    assert scheduler.statistics().permits_out == 2
    cancel = threading.Event()
    waiter = InThread(lambda: scheduler.acquire(cancel=cancel))
    until(lambda: scheduler.statistics().threads_waiting == 1, "the third thread in line")
    cancel.set()
    with pytest.raises(LockCancelled):
        waiter.result()
    first.release()
    second.release()
    assert scheduler.statistics() == SchedulerStatistics(2, 0, 0, 0)
    assert Scheduler(0).statistics().max_parallelism is None


@pytest.fixture(params=["local", "slots_dir"])
def slots_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return None if request.param == "local" else tmp_path / "slots"


# -- lifetime, fork, Ctrl-C ----------------------------------------------------------------------


def test_a_permit_nobody_references_stays_held(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(1, slots_dir=slots)
    with Children("spawn") as children:
        dropped, finish = children.event(), children.event()
        children.start(drop_a_permit, slots, dropped, finish)
        must_wait(dropped, "the child to drop its permit")
        with pytest.raises(LockBusy):
            scheduler.try_acquire()
        finish.set()
        assert children.results() == [1]
    scheduler.try_acquire().release()


def in_forked_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a raw ``os.fork`` child; return what it returned (JSON), or fail."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            outcome: Any = {"ok": body()}
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the test
            outcome = {"error": traceback.format_exc()}
        finally:
            os.write(write_end, json.dumps(outcome).encode())
            os._exit(code)
    os.close(write_end)
    try:
        readable, _, _ = select.select([read_end], [], [], DEADLINE)
        assert readable, "the forked child said nothing"
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
    wait_for_exit(pid)
    outcome = json.loads(data)
    assert "error" not in outcome, outcome.get("error")
    return outcome["ok"]


def test_a_forked_child_holds_no_permits_and_cannot_give_back_the_parents(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    shared, local = Scheduler(1, slots_dir=slots), Scheduler(1)
    local_permit = HeldInThread(a_permit(local))
    with shared.acquire() as permit:
        # A thread of the parent waits for the slot (at the head of the line) as it forks.
        cancel = threading.Event()
        waiter = InThread(lambda: shared.acquire(cancel=cancel))
        until(lambda: shared.statistics().kernel_waiters == 1, "the waiter in the kernel")

        def child() -> list[Any]:
            seen = [
                dataclasses.astuple(shared.statistics()),
                dataclasses.astuple(local.statistics()),
            ]
            permit.release()  # the parent's: nothing happens, and no error,
            permit.release()  # however often
            with pytest.raises(LockBusy):
                shared.try_acquire()  # the parent still holds the slot
            with pytest.raises(LockTimeout):
                shared.acquire(timeout=0.05)
            local.try_acquire().release()  # the local bound is this process's own
            return seen

        assert in_forked_child(child) == [[1, 0, 0, 0], [1, 0, 0, 0]]
        assert shared.statistics() == SchedulerStatistics(1, 1, 1, 1)
        with pytest.raises(LockBusy):
            InThread(shared.try_acquire).result()
        cancel.set()
        with pytest.raises(LockCancelled):
            waiter.result()
    local_permit.release()
    # Not try_acquire: the cancelled waiter's kernel helper takes the freed slot
    # for an instant before dropping it (a documented window), so wait briefly.
    shared.acquire(timeout=DEADLINE).release()
    local.try_acquire().release()


class Interrupted(BaseException):
    """What the test's signal handler raises, in the manner of ``KeyboardInterrupt``."""


@pytest.mark.parametrize("place", ["head", "queued"])
def test_an_interrupted_wait_leaves_nothing_behind(
    all_slots_held_elsewhere: tuple[Scheduler, int, Path], place: str
) -> None:
    scheduler, _, _ = all_slots_held_elsewhere
    ahead = threading.Event()
    if place == "queued":
        head = InThread(lambda: scheduler.acquire(cancel=ahead))
        until(lambda: scheduler.statistics().kernel_waiters == 3, "another thread at the head")
    expected = 2 if place == "queued" else 1

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def interrupt_when_waiting() -> None:
        until(lambda: scheduler.statistics().threads_waiting == expected, "the main thread waiting")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        sender = InThread(interrupt_when_waiting)
        with pytest.raises(KeyboardInterrupt):
            scheduler.acquire(timeout=DEADLINE)
        sender.result()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert scheduler.statistics() == SchedulerStatistics(3, 0, expected - 1, 3 * (expected - 1))
    if place == "queued":
        ahead.set()
        with pytest.raises(LockCancelled):
            head.result()
    assert scheduler.statistics() == SchedulerStatistics(3, 0, 0, 0)
    with pytest.raises(LockTimeout):
        scheduler.acquire(timeout=0.02)
    assert scheduler.statistics() == SchedulerStatistics(3, 0, 0, 0)


@pytest.mark.parametrize("where", ["after the slot is taken", "as the permit is made"])
def test_an_interrupt_before_the_permit_is_returned_gives_everything_back(
    slots_dir: Path | None, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """No permit is left held that no caller ever received (Ctrl-C safety)."""
    scheduler = Scheduler(1, slots_dir=slots_dir)
    if where == "after the slot is taken":
        if slots_dir is None:
            pytest.skip("an in-process scheduler takes no slot")
        real_look = Scheduler._first_free_slot

        def look_then_interrupt(self: Scheduler, attempt: Any) -> Any:
            real_look(self, attempt)
            raise KeyboardInterrupt

        monkeypatch.setattr(Scheduler, "_first_free_slot", look_then_interrupt)
    else:

        class InterruptedPermit(scheduler_module.Permit):
            __slots__ = ()

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                raise KeyboardInterrupt

        monkeypatch.setattr(scheduler_module, "Permit", InterruptedPermit)
    with pytest.raises(KeyboardInterrupt):
        scheduler.acquire(timeout=DEADLINE)
    monkeypatch.undo()
    gc.collect()
    assert scheduler.statistics() == SchedulerStatistics(1, 0, 0, 0)
    scheduler.try_acquire().release()
