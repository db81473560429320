"""Scheduler: at most N permits out, in threads and across processes sharing a slots_dir."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from support import (
    DEADLINE,
    Children,
    InThread,
    hold_every_permit,
    hold_permit,
    max_inside,
    must_wait,
    permit_in_pool,
    read_audit,
    run_under_permits,
    wait_until_blocked,
)

from grex_locks import (
    OWNER_SUFFIX,
    LockBusy,
    LockCancelled,
    LockIOError,
    LockTimeout,
    Scheduler,
    Tier,
    TierViolation,
)
from grex_locks._core import slow_waits


class PermitsHeld:
    """``count`` permits of ``scheduler``, each held by a thread of its own, until exit."""

    def __init__(self, scheduler: Scheduler, count: int, timeout: float = DEADLINE) -> None:
        self._taken = threading.Barrier(count + 1)
        self._release = threading.Event()
        self.slots: list[Path | None] = []
        self._threads = [
            InThread(lambda: self._hold(scheduler, timeout), name=f"permit-{n}")
            for n in range(count)
        ]
        self._taken.wait(DEADLINE)

    def _hold(self, scheduler: Scheduler, timeout: float) -> None:
        try:
            permit = scheduler.acquire(timeout=timeout)
        except BaseException:
            self._taken.abort()
            raise
        with permit:
            self.slots.append(permit.slot)
            self._taken.wait(DEADLINE)
            must_wait(self._release, "the end of the test")

    def __enter__(self) -> PermitsHeld:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        for thread in self._threads:
            thread.result()


def _assert_exactly(scheduler: Scheduler, count: int) -> None:
    """Exactly ``count`` permits can be out at once: no more, and none leaked."""
    with PermitsHeld(scheduler, count), pytest.raises(LockBusy):
        scheduler.try_acquire()


# -- the bound ---------------------------------------------------------------------------------


def test_never_more_than_n_permits_out_across_16_threads(slots_dir: Path | None) -> None:
    bound, workers, rounds = 4, 16, 30
    scheduler = Scheduler(bound, slots_dir=slots_dir)
    mutex = threading.Lock()
    inside: set[Any] = set()
    most = 0
    # First, rounds of exactly `bound` threads that meet inside: only possible if
    # `bound` permits can be out at once.
    full_house = threading.Barrier(bound)

    def work() -> None:
        nonlocal most
        for n in range(rounds):
            with scheduler.acquire(timeout=DEADLINE) as permit:
                # A slot file is held by one thread at a time, too.
                key = permit.slot if slots_dir else threading.get_ident()
                with mutex:
                    assert key not in inside
                    inside.add(key)
                    most = max(most, len(inside))
                    assert len(inside) <= bound
                if n == 0:
                    full_house.wait(DEADLINE)
                with mutex:
                    inside.remove(key)

    threads = [InThread(work) for _ in range(workers)]
    for thread in threads:
        thread.result(3 * DEADLINE)
    assert most == bound
    _assert_exactly(scheduler, bound)


def test_one_slots_dir_bounds_several_scheduler_objects_in_one_process(tmp_path: Path) -> None:
    """Two schedulers on one slots_dir (say, one unpickled back in the parent) share the bound."""
    bound, workers, rounds = 2, 8, 40
    first = Scheduler(bound, slots_dir=tmp_path / "slots")
    second = pickle.loads(pickle.dumps(first))  # noqa: S301 - bytes we just made
    mutex = threading.Lock()
    inside: set[Path | None] = set()

    def work(scheduler: Scheduler) -> int:
        for _ in range(rounds):
            with scheduler.acquire(timeout=DEADLINE) as permit:
                with mutex:
                    assert permit.slot not in inside, f"{permit.slot} handed out twice"
                    inside.add(permit.slot)
                    assert len(inside) <= bound
                with mutex:
                    inside.remove(permit.slot)
        return rounds

    threads = [
        InThread(functools.partial(work, first if n % 2 else second)) for n in range(workers)
    ]
    assert [thread.result(3 * DEADLINE) for thread in threads] == [rounds] * workers
    with PermitsHeld(first, 1), PermitsHeld(second, 1), pytest.raises(LockBusy):
        first.try_acquire()


def test_never_more_than_n_permits_out_across_6_processes(tmp_path: Path) -> None:
    bound, workers, rounds = 2, 6, 30
    scheduler = Scheduler(bound, slots_dir=tmp_path / "slots")
    log = tmp_path / "audit.log"
    with Children("spawn") as children:
        start = children.barrier(workers)
        for _ in range(workers):
            children.start(run_under_permits, scheduler, log, rounds, start)
        assert children.results(timeout=4 * DEADLINE) == [rounds] * workers
    entries = read_audit(log)
    assert len(entries) == 2 * workers * rounds
    assert 1 <= max_inside(entries) <= bound
    # A slot is held by one process at a time.
    slot_users: dict[str, str] = {}
    for what, pid, slot in entries:
        if what == "enter":
            assert slot not in slot_users, f"{pid} took {slot} from {slot_users.get(slot)}"
            slot_users[slot] = pid
        else:
            assert slot_users.pop(slot) == pid
    assert {slot for _, _, slot in entries} <= {"slot-0.lock", "slot-1.lock"}
    _assert_exactly(scheduler, bound)


# -- refusals: cancel, timeout, try ------------------------------------------------------------


def test_cancel_while_saturated_raises_and_leaks_no_permit(slots_dir: Path | None) -> None:
    bound = 2
    scheduler = Scheduler(bound, slots_dir=slots_dir)
    with PermitsHeld(scheduler, bound):
        already = threading.Event()
        already.set()
        with pytest.raises(LockCancelled):
            scheduler.acquire(cancel=already)
        for _ in range(3):
            cancel = threading.Event()
            canceller = InThread(cancel.set)
            with pytest.raises(LockCancelled):
                scheduler.acquire(cancel=cancel)
            canceller.result()
        with pytest.raises(LockTimeout) as timed_out:
            scheduler.acquire(timeout=0.05)
        assert timed_out.value.waited >= 0.0
        with pytest.raises(LockTimeout):
            scheduler.acquire(timeout=0)
        with pytest.raises(LockBusy):
            scheduler.try_acquire()
    _assert_exactly(scheduler, bound)


def test_cancel_while_another_process_holds_every_slot(tmp_path: Path) -> None:
    bound = 2
    scheduler = Scheduler(bound, slots_dir=tmp_path / "slots")
    with Children("spawn") as children:
        held, release = children.event(), children.event()
        children.start(hold_every_permit, bound, tmp_path / "slots", held, release)
        must_wait(held, "the other process to take every slot")
        with pytest.raises(LockBusy):
            scheduler.try_acquire()
        # Cancel once this process is seen waiting in the kernel for a slot.
        cancel = threading.Event()
        waiter = InThread(lambda: scheduler.acquire(cancel=cancel))
        slots = [tmp_path / "slots" / f"slot-{n}.lock" for n in range(bound)]
        wait_until_blocked(slots, os.getpid())
        cancel.set()
        with pytest.raises(LockCancelled):
            waiter.result()
        with pytest.raises(LockTimeout):
            scheduler.acquire(timeout=0.05)
        release.set()
        assert children.results() == [["holder-0", "holder-1"]]
    _assert_exactly(scheduler, bound)


def test_negative_timeout_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        Scheduler(1).acquire(timeout=-0.5)


# -- a dead holder -----------------------------------------------------------------------------


def test_a_sigkilled_slot_holders_slot_is_reused(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(1, slots_dir=slots)
    slot = slots / "slot-0.lock"
    record = Path(str(slot) + OWNER_SUFFIX)

    def wait_for_the_slot() -> tuple[Path | None, int]:
        with scheduler.acquire(timeout=DEADLINE) as permit:
            return permit.slot, json.loads(record.read_text())["pid"]

    with Children("spawn") as children:
        held, release = children.event(), children.event()
        holder_pid = children.start(hold_permit, scheduler, held, release)
        must_wait(held, "the child to take the slot")
        owner = json.loads(record.read_text())
        assert owner["pid"] == holder_pid
        assert owner["tier"] == Tier.SEMAPHORE
        with pytest.raises(LockBusy):
            scheduler.try_acquire()
        waiter = InThread(wait_for_the_slot)
        wait_until_blocked([slot], os.getpid())
        children.processes[0].kill()
        children.processes[0].join(DEADLINE)
        assert waiter.result() == (slot, os.getpid())
    with scheduler.acquire(timeout=DEADLINE) as again:
        assert again.slot == slot


# -- unbounded, max_parallelism, construction --------------------------------------------------


def test_parallel_zero_is_unbounded_and_logs_a_warning() -> None:
    messages: list[Any] = []
    logger.enable("grex_locks")
    sink = logger.add(messages.append, level="WARNING", format="{level}|{name}|{message}")
    try:
        scheduler = Scheduler(0)
    finally:
        logger.remove(sink)
        logger.disable("grex_locks")
    assert len(messages) == 1
    level, name, text = str(messages[0]).rstrip("\n").split("|", 2)
    assert level == "WARNING"
    assert name.startswith("grex_locks")
    assert "0" in text
    assert scheduler.max_parallelism is None
    many = 24
    with PermitsHeld(scheduler, many) as held:
        assert held.slots == [None] * many
        scheduler.try_acquire().release()


def test_max_parallelism_is_the_bound(tmp_path: Path) -> None:
    assert Scheduler(1).max_parallelism == 1
    assert Scheduler(7).max_parallelism == 7
    assert Scheduler(3, slots_dir=tmp_path / "three").max_parallelism == 3
    assert Scheduler(0, slots_dir=tmp_path / "unbounded").max_parallelism is None
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError)):
            Scheduler(bad)  # type: ignore[arg-type]


def test_slot_files_carry_owner_records(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(2, slots_dir=slots)
    with scheduler.acquire() as permit:
        assert permit.slot is not None
        assert permit.slot.parent == slots
        assert permit.slot.name in {"slot-0.lock", "slot-1.lock"}
        record = json.loads(Path(str(permit.slot) + OWNER_SUFFIX).read_text())
        assert record["pid"] == os.getpid()
        assert record["thread"] == threading.current_thread().name
    assert Path(str(permit.slot) + OWNER_SUFFIX).read_text().strip() == ""
    with Scheduler(2).acquire() as local:
        assert local.slot is None


# -- pickling ----------------------------------------------------------------------------------


def test_a_scheduler_with_slots_dir_pickles_and_bounds_pool_workers(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    scheduler = Scheduler(1, slots_dir=slots)
    copy = pickle.loads(pickle.dumps(scheduler))  # noqa: S301 - bytes we just made
    assert isinstance(copy, Scheduler)
    assert copy.max_parallelism == 1
    assert copy.slots_dir == slots
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        with scheduler.acquire():
            busy = pool.submit(permit_in_pool, scheduler).result(timeout=3 * DEADLINE)
        assert busy[1:] == ("", 1, "LockBusy")
        done = [pool.submit(permit_in_pool, scheduler) for _ in range(4)]
        for future in done:
            _pid, slot, bound, outcome = future.result(timeout=3 * DEADLINE)
            assert (slot, bound, outcome) == ("slot-0.lock", 1, "acquired")


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_slots_dir_the_worker_cannot_use_fails_its_task_not_the_pool(
    tmp_path: Path, method: str
) -> None:
    # The slots directory became a file after the scheduler was made: in the
    # worker, the unpickled scheduler cannot open it. That is the task's error;
    # a failing unpickling would kill the worker and break the whole pool.
    slots = tmp_path / "slots"
    scheduler = Scheduler(1, slots_dir=slots)
    fine = Scheduler(1, slots_dir=tmp_path / "fine")
    for leftover in slots.iterdir():
        leftover.unlink()
    slots.rmdir()
    slots.write_text("a file where the slots were\n")
    copy = pickle.loads(pickle.dumps(scheduler))  # noqa: S301 - bytes we just made
    assert repr(copy) == repr(scheduler)
    assert copy.max_parallelism == 1
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        with pytest.raises(LockIOError):
            pool.submit(permit_in_pool, scheduler).result(timeout=3 * DEADLINE)
        _pid, slot, bound, outcome = pool.submit(permit_in_pool, fine).result(timeout=3 * DEADLINE)
        assert (slot, bound, outcome) == ("slot-0.lock", 1, "acquired")
    assert slots.read_text() == "a file where the slots were\n"


def test_a_scheduler_without_slots_dir_refuses_to_pickle() -> None:
    with pytest.raises(TypeError, match="slots_dir"):
        pickle.dumps(Scheduler(2))
    with pytest.raises(TypeError):
        pickle.dumps(Scheduler(0))


# -- misuse ------------------------------------------------------------------------------------


def test_two_permits_in_one_thread_are_a_tier_violation(tmp_path: Path) -> None:
    scheduler = Scheduler(3)
    other = Scheduler(3, slots_dir=tmp_path / "slots")
    with scheduler.acquire() as permit:
        for take in (scheduler.acquire, scheduler.try_acquire, other.acquire, other.try_acquire):
            with pytest.raises(TierViolation) as caught:
                take()
            assert caught.value.held == Tier.SEMAPHORE
            assert caught.value.requested == Tier.SEMAPHORE
        # Nothing was taken by the refused calls: two other threads still get permits.
        with PermitsHeld(scheduler, 2), pytest.raises(LockBusy):
            InThread(scheduler.try_acquire).result()
        assert permit.slot is None
    _assert_exactly(other, 3)


def test_release_from_another_thread_is_a_runtime_error(slots_dir: Path | None) -> None:
    scheduler = Scheduler(1, slots_dir=slots_dir)
    permit = scheduler.acquire()
    with pytest.raises(RuntimeError):
        InThread(permit.release).result()
    # Still held, and still ours to release.
    with pytest.raises(LockBusy):
        InThread(scheduler.try_acquire).result()
    permit.release()
    _assert_exactly(scheduler, 1)


def test_double_release_is_a_runtime_error(slots_dir: Path | None) -> None:
    scheduler = Scheduler(1, slots_dir=slots_dir)
    permit = scheduler.acquire()
    permit.release()
    with pytest.raises(RuntimeError):
        permit.release()
    with scheduler.acquire() as again:
        pass
    with pytest.raises(RuntimeError):
        again.release()
    _assert_exactly(scheduler, 1)


# -- logging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "slots"])
def test_a_slow_wait_for_a_permit_is_logged_with_who_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # As for a lock: a wait past the slow-wait threshold logs one WARNING that
    # says what it waits for and who holds it.
    monkeypatch.setattr(slow_waits, "SLOW_WAIT_SECONDS", 0.2)
    scheduler = Scheduler(1, slots_dir=tmp_path / "slots" if where == "slots" else None)
    logged: list[str] = []
    given_up = threading.Event()

    def sink(message: Any) -> None:
        if "still waiting" in message.record["message"]:
            logged.append(message.record["message"])
            given_up.set()

    handler = logger.add(sink, level="WARNING")
    logger.enable("grex_locks")
    try:
        with PermitsHeld(scheduler, 1), pytest.raises(LockCancelled):
            scheduler.acquire(timeout=DEADLINE, cancel=given_up)
    finally:
        logger.disable("grex_locks")
        logger.remove(handler)
    assert len(logged) == 1
    assert logged[0].startswith("still waiting after ")
    assert f"for a permit of {scheduler!r}" in logged[0]
    if where == "slots":
        assert f"slot-0.lock held by pid {os.getpid()}" in logged[0]
    else:
        assert "held by threads permit-0 of this process" in logged[0]
