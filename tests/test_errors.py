"""The error tree: every error pickles, and says which lock and who holds it."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import (
    DEADLINE,
    HOLD_BACKSTOP,
    HeldInThread,
    Holders,
    PipedChild,
    hold_until_told,
    third_process_can_take,
    until,
)

from grex_locks import (
    BackendLock,
    Diagnosis,
    HolderState,
    LockBusy,
    LockCancelled,
    LockError,
    LockIOError,
    LockTimeout,
    ManifestLock,
    PackLock,
    Scheduler,
    Tier,
    TierViolation,
    WorkspaceBusy,
    _holder_errors,
)
from grex_locks._core.lock_file import FileKey
from grex_locks._core.waiting import Wake, wait_for
from grex_locks._diagnostics.diagnose import diagnose_busy as diagnose_busy_of_record

LOCK_FILE = Path("/srv/packs/alpha/.grex-lock")


def _constructed() -> list[LockError]:
    """One fresh error of each kind (fresh, so that a test may give them causes)."""
    return [
        LockError(LOCK_FILE),
        LockError(LOCK_FILE, "a message"),
        LockBusy(LOCK_FILE),
        WorkspaceBusy(LOCK_FILE),
        LockTimeout(LOCK_FILE, waited=1.25),
        LockCancelled(LOCK_FILE),
        TierViolation(LOCK_FILE, held=Tier.BACKEND, requested=Tier.PER_PACK),
        LockIOError(LOCK_FILE),
    ]


CONSTRUCTED = _constructed()


def _round_trip(error: LockError) -> LockError:
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, LockError)
    return copy


def _assert_same(copy: LockError, error: LockError) -> None:
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.path == error.path
    if isinstance(error, LockTimeout):
        assert isinstance(copy, LockTimeout)
        assert copy.waited == error.waited
    if isinstance(error, TierViolation):
        assert isinstance(copy, TierViolation)
        assert (copy.held, copy.requested) == (error.held, error.requested)
        assert isinstance(copy.held, Tier)
        assert isinstance(copy.requested, Tier)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, also on Python 3.10 (which reads ``__notes__`` the same way)."""
    notes = getattr(error, "__notes__", None)
    if notes is None:
        notes = error.__notes__ = []
    notes.append(note)


def test_the_tree() -> None:
    assert issubclass(LockError, Exception)
    assert issubclass(LockBusy, LockError)
    assert issubclass(WorkspaceBusy, LockBusy)
    assert issubclass(LockTimeout, LockError)
    assert issubclass(LockTimeout, TimeoutError)
    assert issubclass(LockCancelled, LockError)
    assert issubclass(TierViolation, LockError)
    assert issubclass(LockIOError, LockError)


@pytest.mark.parametrize("error", CONSTRUCTED, ids=lambda e: type(e).__name__)
def test_every_error_pickles(error: LockError) -> None:
    _assert_same(_round_trip(error), error)


@pytest.mark.parametrize("error", CONSTRUCTED, ids=lambda e: type(e).__name__)
def test_str_names_the_lock_and_never_advises_deleting(error: LockError) -> None:
    text = str(error)
    assert str(LOCK_FILE) in text or "a message" in text
    assert "delete" not in text.lower()


def test_constructed_fields() -> None:
    timeout = LockTimeout(LOCK_FILE, waited=1.25)
    assert timeout.waited == 1.25
    assert timeout.holder is None
    violation = TierViolation(LOCK_FILE, held=Tier.BACKEND, requested=Tier.PER_PACK)
    assert violation.held is Tier.BACKEND
    assert violation.requested is Tier.PER_PACK
    assert "BACKEND" in str(violation)
    assert "PER_PACK" in str(violation)
    assert LockBusy(LOCK_FILE).holder is None
    # Built by hand, each still says what happened, not just "lock error".
    assert str(LockCancelled(LOCK_FILE)) == f"waiting for lock {LOCK_FILE} was cancelled"
    assert "busy" in str(LockBusy(LOCK_FILE))
    assert "timed out" in str(LockTimeout(LOCK_FILE))
    assert "cannot use" in str(LockIOError(LOCK_FILE))


@pytest.fixture
def held_elsewhere(pack: Path) -> Iterator[tuple[PackLock, int]]:
    """A pack lock held (with its owner record) by a child process; its pid."""
    lock = PackLock(pack)
    child = PipedChild("fork", hold_until_told, PackLock(pack))
    _, pid = child.recv()
    yield lock, pid
    child.send("release")
    child.expect("released")
    child.__exit__()


def _errors_meeting_a_holder(lock: PackLock) -> list[LockError]:
    errors: list[LockError] = []
    with pytest.raises(LockBusy) as busy:
        lock.try_acquire()
    errors.append(busy.value)
    with pytest.raises(LockTimeout) as timed_out:
        lock.acquire(timeout=0.05)
    errors.append(timed_out.value)
    return errors


def test_real_errors_name_the_lock_and_the_holder_pid(held_elsewhere: tuple[PackLock, int]) -> None:
    lock, pid = held_elsewhere
    for error in _errors_meeting_a_holder(lock):
        text = str(error)
        assert str(lock.path) in text
        assert str(pid) in text, f"{type(error).__name__} does not name holder {pid}: {text}"
        assert "delete" not in text.lower()
        copy = _round_trip(error)
        _assert_same(copy, error)


def test_real_errors_pickle_with_their_holder(held_elsewhere: tuple[PackLock, int]) -> None:
    lock, _ = held_elsewhere
    for error in _errors_meeting_a_holder(lock):
        assert isinstance(error, (LockBusy, LockTimeout))
        copy = _round_trip(error)
        assert isinstance(copy, (LockBusy, LockTimeout))
        assert (copy.holder is None) == (error.holder is None)


def _foreign_flock(conn: multiprocessing.connection.Connection, lock_file: Path) -> None:
    fd = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    conn.send("held")
    conn.poll(HOLD_BACKSTOP)


def test_holder_without_a_record_still_gives_a_sentence(pack: Path) -> None:
    lock = PackLock(pack)
    with PipedChild("fork", _foreign_flock, lock.path) as holder:
        holder.expect("held")
        with pytest.raises(LockBusy) as caught:
            lock.try_acquire()
        text = str(caught.value)
        assert str(lock.path) in text
        assert "delete" not in text.lower()
        _assert_same(_round_trip(caught.value), caught.value)
        holder.kill()


def test_real_tier_violation_cancel_and_io_errors(pack: Path, tmp_path: Path) -> None:
    errors: list[LockError] = []
    with BackendLock(tmp_path / "dest"), pytest.raises(TierViolation) as violation:
        PackLock(pack).acquire()
    errors.append(violation.value)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LockCancelled) as cancelled:
        PackLock(pack).acquire(cancel=cancel)
    errors.append(cancelled.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".grex-lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LockIOError) as refused:
        PackLock(tmp_path / "bad")
    errors.append(refused.value)
    for error in errors:
        assert error.path is not None
        assert str(error.path) in str(error)
        assert "delete" not in str(error).lower()
        _assert_same(_round_trip(error), error)


def test_holds_permits_and_groups_refuse_to_pickle_saying_what_to_send(tmp_path: Path) -> None:
    """A hold is one thread's; what travels is the lock object (as a fresh, unheld lock)."""
    import grex_locks

    scheduler = grex_locks.Scheduler(1, slots_dir=tmp_path / "slots")
    with scheduler.acquire() as permit:
        with pytest.raises(TypeError, match=r"scheduler permit .* cannot be sent"):
            pickle.dumps(permit)
        packs = [grex_locks.PackLock(tmp_path / "a"), grex_locks.PackLock(tmp_path / "b")]
        with grex_locks.acquire_all(packs) as group:
            with pytest.raises(TypeError, match=r"group of locks .* cannot be sent"):
                pickle.dumps(group)
            with pytest.raises(TypeError, match="send the lock object itself"):
                pickle.dumps(packs[0]._core.hold_of_current_thread())
            fresh = pickle.loads(pickle.dumps(packs[0]))  # noqa: S301 - our own bytes
            assert fresh.path == packs[0].path
            assert not fresh.held


# -- the cause travels with the error ------------------------------------------------------------


def _raised_from(error: LockError, cause: BaseException) -> LockError:
    """``error`` as the library raises it: ``raise error from cause`` while handling ``cause``."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise error from exc
    except LockError as raised:
        return raised


def _os_error() -> OSError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(LOCK_FILE))


def _assert_same_os_error(copy: BaseException | None, original: OSError) -> None:
    assert type(copy) is type(original)
    assert isinstance(copy, OSError)
    assert (copy.errno, copy.strerror, copy.filename) == (
        original.errno,
        original.strerror,
        original.filename,
    )


@pytest.mark.parametrize(
    "index", range(len(CONSTRUCTED)), ids=lambda i: type(CONSTRUCTED[i]).__name__
)
def test_every_error_pickles_with_its_cause(index: int) -> None:
    cause = _os_error()
    error = _raised_from(_constructed()[index], cause)
    copy = _round_trip(error)
    _assert_same(copy, error)
    _assert_same_os_error(copy.__cause__, cause)
    assert copy.__context__ is copy.__cause__
    assert copy.__suppress_context__


def test_a_real_lock_io_error_keeps_its_os_error_through_pickle(tmp_path: Path) -> None:
    (tmp_path / "pack" / ".grex-lock").mkdir(parents=True)
    with pytest.raises(LockIOError) as refused:
        PackLock(tmp_path / "pack")
    cause = refused.value.__cause__
    assert isinstance(cause, IsADirectoryError)
    copy = _round_trip(refused.value)
    _assert_same(copy, refused.value)
    _assert_same_os_error(copy.__cause__, cause)


def test_a_chain_of_causes_pickles_whole() -> None:
    inner = _raised_from(LockIOError(LOCK_FILE, "inner"), _os_error())
    outer = _raised_from(LockTimeout(LOCK_FILE, waited=2.0), inner)
    copy = _round_trip(outer)
    _assert_same(copy, outer)
    assert isinstance(copy.__cause__, LockIOError)
    _assert_same(copy.__cause__, inner)
    _assert_same_os_error(copy.__cause__.__cause__, _os_error())


def test_notes_and_attributes_set_later_travel_too() -> None:
    error = LockBusy(LOCK_FILE)
    add_note(error, "while syncing pack alpha")
    copy = _round_trip(error)
    assert copy.__notes__ == ["while syncing pack alpha"]


class _Unpicklable(Exception):
    """An exception that cannot be pickled: it carries a lock."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.guard = threading.Lock()


@pytest.mark.parametrize("link", ["__cause__", "__context__"])
def test_an_unpicklable_cause_does_not_make_the_error_unpicklable(link: str) -> None:
    error = LockIOError(LOCK_FILE, "refused")
    setattr(error, link, _Unpicklable("the reason"))
    with pytest.raises(TypeError):
        pickle.dumps(getattr(error, link))
    copy = _round_trip(error)
    _assert_same(copy, error)
    stand_in = getattr(copy, link)
    assert stand_in is not None
    assert "_Unpicklable" in str(stand_in)
    assert "the reason" in str(stand_in)


def test_a_cycle_of_causes_pickles() -> None:
    first = LockError(LOCK_FILE, "first")
    second = LockError(LOCK_FILE, "second")
    first.__cause__ = second
    second.__cause__ = first
    copy = _round_trip(first)
    assert copy.__cause__ is not None
    assert str(copy.__cause__) == "second"
    assert copy.__cause__.__cause__ is copy


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read"])
def test_scheduler_refusals_pickle_with_cause_and_notes(read_first: bool) -> None:
    """A permit refusal (its holders diagnosed when first read) keeps its chain too."""
    scheduler = Scheduler(1)
    with HeldInThread(lambda: scheduler.acquire(timeout=DEADLINE)):
        with pytest.raises(LockBusy) as busy:
            scheduler.try_acquire()
        with pytest.raises(LockTimeout) as timed_out:
            scheduler.acquire(timeout=0.01)
    for refusal in (busy.value, timed_out.value):
        if read_first:
            str(refusal)
        error = _raised_from(refusal, _os_error())
        add_note(error, "while running pack alpha")
        copy = _round_trip(error)
        _assert_same(copy, error)
        _assert_same_os_error(copy.__cause__, _os_error())
        assert copy.__notes__ == ["while running pack alpha"]


# -- a pool worker's error reaches the parent whole ------------------------------------------------


def _open_pack_lock(pack: Path) -> None:
    """A pool task: open a pack lock (the pack has a directory where its lock file goes)."""
    PackLock(pack)


def _raise(error: LockError) -> None:
    """A pool task: raise ``error`` (which travelled to the worker pickled)."""
    raise error


def test_errors_raised_in_a_spawn_pool_worker_keep_attributes_and_os_error(tmp_path: Path) -> None:
    """What the worker raised, the parent catches: class, message, attributes, and the OSError.

    The pool itself (``concurrent.futures``) replaces every exception's
    ``__cause__`` with the worker's formatted traceback; the OSError the
    error was raised from is still its ``__context__``, and named in that
    traceback.
    """
    (tmp_path / "pack" / ".grex-lock").mkdir(parents=True)
    with pytest.raises(LockIOError) as here:
        PackLock(tmp_path / "pack")
    sent = [_raised_from(error, _os_error()) for error in _constructed()]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        opened = pool.submit(_open_pack_lock, tmp_path / "pack")
        raised = [pool.submit(_raise, error) for error in sent]
        with pytest.raises(LockIOError) as caught:
            opened.result(timeout=3 * DEADLINE)
        received: list[BaseException | None] = [
            future.exception(timeout=3 * DEADLINE) for future in raised
        ]
    _assert_same(caught.value, here.value)
    context = caught.value.__context__
    assert isinstance(context, IsADirectoryError)
    assert isinstance(here.value.__cause__, OSError)
    _assert_same_os_error(context, here.value.__cause__)
    assert "IsADirectoryError" in str(caught.value.__cause__)
    for error, back in zip(sent, received, strict=True):
        assert isinstance(back, LockError)
        _assert_same(back, error)
        _assert_same_os_error(back.__context__, _os_error())


def _try_lock_sent(lock: PackLock) -> str:
    """A pool task: try the lock that came in the task's arguments."""
    with lock.try_acquire():
        return "acquired"


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_lock_the_worker_cannot_open_fails_its_task_not_the_pool(
    tmp_path: Path, method: str
) -> None:
    # The pack's directory became a file after the lock was made: unpickled
    # in the worker, the lock cannot be opened. That is the task's error; a
    # failing unpickling would kill the worker and break the whole pool.
    pack = tmp_path / "pack"
    lock = PackLock(pack)
    fine = PackLock(tmp_path / "other")
    (pack / ".grex-lock").unlink()
    pack.rmdir()
    pack.write_text("a file where the pack was\n")
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        with pytest.raises(LockIOError, match="not a directory"):
            pool.submit(_try_lock_sent, lock).result(timeout=3 * DEADLINE)
        assert pool.submit(_try_lock_sent, fine).result(timeout=3 * DEADLINE) == "acquired"
    assert pack.read_text() == "a file where the pack was\n"


def test_a_failed_flock_is_a_lock_io_error_with_the_os_error_as_cause(tmp_path: Path) -> None:
    from grex_locks._core import os_lock

    path = tmp_path / "closed.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    os.close(fd)  # flock on a closed descriptor: EBADF
    calls: dict[str, Callable[[], object]] = {
        "try_lock": lambda: os_lock.try_lock(fd, path, False),
        "lock_blocking": lambda: os_lock.lock_blocking(fd, path, shared=False),
        "unlock": lambda: os_lock.unlock(fd, path),
    }
    for name, call in calls.items():
        with pytest.raises(LockIOError) as caught:
            call()
        cause = caught.value.__cause__
        assert isinstance(cause, OSError), name
        assert cause.errno == errno.EBADF, name
        assert caught.value.path == path


def _count_diagnoses(monkeypatch: pytest.MonkeyPatch, slow_until: Callable[[], bool]) -> list[Path]:
    """Count the holder diagnoses refusals ask for; each waits for ``slow_until()`` (a slow one)."""
    calls: list[Path] = []
    real = diagnose_busy_of_record

    def diagnose_busy(path: Path, key: FileKey) -> Diagnosis:
        calls.append(path)
        until(slow_until, "the other refusals to join the diagnosis in progress")
        return real(path, key)

    monkeypatch.setattr(_holder_errors, "diagnose_busy", diagnose_busy)
    return calls


def test_a_cancelled_wait_returns_without_diagnosing_the_holder(
    held_elsewhere: tuple[PackLock, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # LockCancelled names no holder: a diagnosis (slow on a machine with
    # thousands of processes) would only delay the return the caller asked for.
    lock, _ = held_elsewhere
    calls = _count_diagnoses(monkeypatch, lambda: True)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LockCancelled):
        lock.acquire(cancel=cancel)
    with pytest.raises(LockBusy):
        lock.try_acquire()
    assert calls == [lock.path]


def test_threads_refused_together_share_one_diagnosis(
    held_elsewhere: tuple[PackLock, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Forty waiters timing out together must not diagnose forty times in a
    # row (the last would return long after its deadline).
    lock, _ = held_elsewhere
    n = 8
    joined: list[int] = []

    class CountedWake(Wake):
        __slots__ = ()

        def wait(self, timeout: float | None = None) -> bool:
            joined.append(1)
            return super().wait(timeout)

    def counted(self: Any) -> None:
        self.done = CountedWake()
        self.finished = False
        self.result = None

    monkeypatch.setattr(_holder_errors._Diagnosing, "__init__", counted)

    calls = _count_diagnoses(monkeypatch, lambda: len(joined) == n - 1)
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def wait_briefly() -> None:
        start.wait(DEADLINE)
        try:
            PackLock(lock.path.parent).acquire(timeout=0.05)
        except LockTimeout as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait_briefly) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert len(errors) == n
    assert len(calls) == 1


def test_a_timeout_names_the_holder_found_before_the_deadline_only_while_it_still_holds(
    tmp_path: Path, holders: Holders
) -> None:
    # The holder is diagnosed shortly before the deadline, so that the
    # timeout is raised on time; at the deadline that diagnosis is used only
    # if its record is still byte for byte there. Here the holder changes in
    # between (one process lets go, another takes it): the error must name
    # the new one.
    lock = PackLock(tmp_path)
    first = holders.hold_with_library("PackLock", tmp_path)
    early = _holder_errors.EarlyDiagnosis(lock.path, lock._core.key)
    early()
    then = early.holder()
    assert then is not None
    assert then.state is HolderState.HELD
    assert [h.pid for h in then.holders] == [first.pid]
    assert first.stdin is not None
    first.stdin.close()
    first.wait(DEADLINE)
    second = holders.hold_with_library("PackLock", tmp_path)
    now = early.holder()
    assert now is not None
    assert now.state is HolderState.HELD
    assert [h.pid for h in now.holders] == [second.pid]
    # And the whole path: a timeout names the holder of the moment.
    with pytest.raises(LockTimeout) as caught:
        lock.acquire(timeout=0.05)
    assert f"pid {second.pid}" in str(caught.value)


def test_a_timeout_does_not_name_a_recorded_holder_killed_since_the_early_diagnosis(
    tmp_path: Path, holders: Holders
) -> None:
    # Found by a trial: the record of a holder killed (SIGKILL, no blanking)
    # while the child it handed its descriptor to keeps the lock is byte for
    # byte unchanged, yet the early diagnosis (HELD by it) is no longer true.
    lock = PackLock(tmp_path)
    holder = holders.hold(lock.path, extra="handoff")
    heir = holders.strays[-1]
    early = _holder_errors.EarlyDiagnosis(lock.path, lock._core.key)
    early()
    then = early.holder()
    assert then is not None
    assert then.state is HolderState.HELD
    assert holder.pid in [h.pid for h in then.holders]
    holders.kill(holder)
    now = early.holder()
    assert now is not None
    assert now.state is HolderState.ORPHANED
    assert [h.pid for h in now.holders] == [heir]


def test_a_timeout_does_not_reuse_an_early_diagnosis_of_a_shared_hold(
    tmp_path: Path, holders: Holders
) -> None:
    # Readers can come and go unseen by the record: a shared hold is
    # diagnosed again at the deadline.
    lock = ManifestLock(tmp_path / "manifest.lock")
    first = holders.hold(lock.path, mode="sh", record="none")
    early = _holder_errors.EarlyDiagnosis(lock.path, lock._core.key)
    early()
    second = holders.hold(lock.path, mode="sh", record="none")
    holders.kill(first)
    now = early.holder()
    assert now is not None
    assert now.shared
    assert [h.pid for h in now.holders] == [second.pid]


class _Noted:
    """A near_deadline that notes when it was called."""

    # Far enough ahead that a busy machine (CI runs three suites at once)
    # cannot make the call land after the deadline.
    lead = 0.2

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self) -> None:
        self.calls.append(time.monotonic())


def test_a_wait_calls_its_near_deadline_once_and_only_while_still_waiting() -> None:
    noted = _Noted()
    wake = Wake()
    began = time.monotonic()
    deadline = began + 0.4
    wait_for(wake, deadline, None, near_deadline=noted)
    assert len(noted.calls) == 1
    assert began + 0.1 < noted.calls[0] < deadline  # near the deadline, not at the start
    assert time.monotonic() >= deadline
    wake.set()  # granted before the deadline drew near: nothing to prepare
    wait_for(wake, time.monotonic() + 0.05, None, near_deadline=noted)
    assert len(noted.calls) == 1


def test_threads_using_an_unpickled_lock_first_at_once_share_it(tmp_path: Path) -> None:
    # An unpickled lock opens its file at first use; threads racing to that
    # first use must end up on one lock object (each thread releases what it
    # took, and they exclude each other).
    copy = pickle.loads(pickle.dumps(PackLock(tmp_path)))  # noqa: S301 - bytes we just made
    start = threading.Barrier(8)
    inside: list[int] = []
    errors: list[BaseException] = []

    def take_and_leave() -> None:
        try:
            start.wait(DEADLINE)
            for _ in range(20):
                with copy:
                    inside.append(1)
                    assert len(inside) == 1
                    inside.pop()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take_and_leave) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not errors
    assert not copy.held
    # And nothing was left locked for anyone else (a second core's hold, say).
    assert third_process_can_take(copy.path)


def _refused_by_the_parent(pack: str) -> LockError:
    try:
        PackLock(pack).acquire(timeout=0.05)
    except LockError as exc:
        return exc
    raise AssertionError("granted while the parent holds it")


def test_a_workers_error_read_in_the_parent_names_the_holder_truly(tmp_path: Path) -> None:
    # Found by a trial: the message said "this process's own parent", made in
    # the worker; read in the parent (the holder), it pointed at its parent.
    ctx = multiprocessing.get_context("spawn")
    with PackLock(tmp_path).acquire(), ctx.Pool(1) as pool:
        error = pool.apply(_refused_by_the_parent, (str(tmp_path),))
    assert isinstance(error, LockTimeout)
    message = str(error)
    assert f"held by pid {os.getpid()} " in message, message
    assert "— the parent of pid " in message, message
    assert "this process" not in message, message
