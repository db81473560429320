"""diagnose(): every HolderState produced for real, hostile records, and no side effects.

Holders are real processes (``python -c`` children, util-linux ``flock(1)``,
grex_locks itself in a child), killed with a real SIGKILL. Handshakes go
over the children's stdout; a child lives exactly as long as its stdin pipe
is open, so closing it (or the test failing) ends it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DEADLINE, Holders, check_words, read_line

from grex_locks import PackLock, WorkspaceLock
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import Diagnosis, Holder, HolderState
from grex_locks._diagnostics.kernel_lock_table import KernelLockTable
from grex_locks._diagnostics.scan import scan
from grex_locks.errors import LockBusy, LockTimeout


@pytest.fixture
def lock(tmp_path: Path) -> Path:
    path = tmp_path / ".grex-lock"
    path.touch()
    return path


def write_record(lock: Path, record: dict[str, Any]) -> None:
    Path(f"{lock}.owner").write_text(json.dumps(record))


def own_record(**changes: Any) -> dict[str, Any]:
    record = {
        "pid": os.getpid(),
        "create_time": psutil.Process().create_time(),
        "hostname": socket.gethostname(),
        "thread": "MainThread",
        "tier": 2,
        "acquired_at": time.time(),
        "argv": ["sync.py", "--all"],
    }
    record.update(changes)
    return record


# -- the six states, for real --------------------------------------------------


def test_missing_lock_file_is_free(tmp_path: Path) -> None:
    d = diagnose(tmp_path / "nope" / ".grex-lock")
    assert d.state is HolderState.FREE
    assert d.holders == []
    assert d.holder_summary() == ""
    assert not (tmp_path / "nope").exists()
    check_words(d)


@pytest.mark.parametrize("record", [None, b"", b"  \n"])
def test_free_with_no_or_empty_record(lock: Path, record: bytes | None) -> None:
    if record is not None:
        Path(f"{lock}.owner").write_bytes(record)
    d = diagnose(lock)
    assert d.state is HolderState.FREE
    assert d.path == lock
    assert d.holders == []
    assert d.waiters == []
    check_words(d)


def test_held_by_another_process(lock: Path, holders: Holders) -> None:
    proc = holders.hold(lock)
    d = diagnose(lock)
    assert d.state is HolderState.HELD
    assert [h.pid for h in d.holders] == [proc.pid]
    assert d.owner is not None
    assert d.owner["pid"] == proc.pid
    assert d.lock_pids == (proc.pid,)
    holder = d.holders[0]
    assert holder.create_time == pytest.approx(psutil.Process(proc.pid).create_time())
    assert holder.cmdline[:2] == [sys.executable, "-c"]
    assert holder.username
    summary = d.holder_summary()
    assert summary.startswith(f"held by pid {proc.pid} (")
    assert ", thread worker-3, for " in summary
    assert summary.endswith(" s")
    check_words(d)


def test_held_shared_without_record(lock: Path, holders: Holders) -> None:
    first = holders.hold(lock, mode="sh", record="none")
    second = holders.hold(lock, mode="sh", record="none")
    d = diagnose(lock)
    assert d.state is HolderState.HELD
    assert d.shared
    assert sorted(h.pid for h in d.holders) == sorted([first.pid, second.pid])
    assert d.holder_summary().startswith("held shared by 2 readers: pid ")
    check_words(d)


def test_stale_record_after_sigkill(lock: Path, holders: Holders) -> None:
    proc = holders.hold(lock)
    holders.kill(proc)
    d = diagnose(lock)
    assert d.state is HolderState.STALE_RECORD
    assert d.owner is not None
    assert d.owner["pid"] == proc.pid
    assert d.holders == []
    assert d.holder_summary() == ""
    assert "doctor --prune" in d.explain()
    check_words(d)


def test_orphaned_when_the_descriptor_outlives_its_recorded_owner(
    lock: Path, holders: Holders
) -> None:
    proc = holders.hold(lock, extra="handoff")
    grandchild = holders.strays[-1]
    holders.kill(proc)
    d = diagnose(lock)
    assert d.state is HolderState.ORPHANED
    assert [h.pid for h in d.holders] == [grandchild]
    assert d.owner is not None
    assert d.owner["pid"] == proc.pid
    assert f"held by pid {grandchild} (" in d.holder_summary()
    assert f"inherited from pid {proc.pid}" in d.holder_summary()
    check_words(d)
    # The errors an acquire raises say the same: the dead holder took the lock.
    for error in errors_meeting_a_holder(lock.parent):
        assert error.holder is not None
        assert error.holder.state is HolderState.ORPHANED, str(error)
        assert f"pid {grandchild} (" in str(error)
        assert f"inherited from pid {proc.pid}" in str(error)


#: Print "ready", then hold until stdin closes: the command a holder runs.
READY = "import sys; print('ready', flush=True); sys.stdin.read()"

#: Take a grex lock (pack or workspace) on argv[2], say "ready", hold until stdin closes.
GREX_HOLDER = r"""
import sys
from grex_locks import PackLock, WorkspaceLock
hold = (PackLock if sys.argv[1] == "pack" else WorkspaceLock)(sys.argv[2]).acquire()
print("ready", flush=True)
sys.stdin.read()
"""


def errors_meeting_a_holder(directory: Path, kind: str = "pack") -> list[LockBusy | LockTimeout]:
    """The errors a grex acquire of ``directory``'s lock of ``kind`` raises now: busy, timed out."""
    lock = PackLock(directory) if kind == "pack" else WorkspaceLock(directory)
    errors: list[LockBusy | LockTimeout] = []
    with pytest.raises(LockBusy) as busy:
        lock.try_acquire()
    errors.append(busy.value)
    if kind == "pack":
        with pytest.raises(LockTimeout) as timed_out:
            lock.acquire(timeout=0.05)
        errors.append(timed_out.value)
    return errors


def flock_holding(holders: Holders, lock: Path) -> Any:
    """util-linux ``flock -o LOCK CMD``: flock(1) itself holds ``lock`` while CMD runs."""
    flock = shutil.which("flock")
    if flock is None:
        pytest.skip("util-linux flock(1) is not installed")
    proc = holders.spawn(flock, "-o", str(lock), sys.executable, "-c", READY)
    assert read_line(proc) == "ready"
    return proc


@pytest.mark.parametrize("kind", ["pack", "workspace"])
def test_a_foreign_flock_after_a_crash_is_an_unknown_holder_in_errors_too(
    tmp_path: Path, holders: Holders, kind: str
) -> None:
    """A SIGKILLed grex holder leaves its record; flock(1) then takes the lock: UNKNOWN_HOLDER.

    The record names a process that neither holds nor took the lock, and
    the errors an acquire raises must not say the flock(1) process inherited it.
    """
    crashed = holders.spawn(sys.executable, "-c", GREX_HOLDER, kind, str(tmp_path))
    assert read_line(crashed) == "ready"
    holders.kill(crashed)
    lock = tmp_path / (".grex-lock" if kind == "pack" else ".grex.sync.lock")
    flock = flock_holding(holders, lock)
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert d.owner is not None
    assert d.owner["pid"] == crashed.pid
    errors = errors_meeting_a_holder(tmp_path, kind)
    for error in errors:
        text = str(error)
        assert error.holder is not None
        assert error.holder.state is HolderState.UNKNOWN_HOLDER, text
        assert "inherited" not in text
        assert f"held by pid {flock.pid} (flock " in text
        assert f"not by pid {crashed.pid} that its owner record names" in text
        assert "inherited" not in error.holder.explain()
        check_words(error.holder)


def test_unknown_holder_util_linux_flock(lock: Path, holders: Holders) -> None:
    flock = shutil.which("flock")
    if flock is None:
        pytest.skip("util-linux flock(1) is not installed")
    ready = "import sys; print('ready', flush=True); sys.stdin.read()"
    proc = holders.spawn(flock, str(lock), sys.executable, "-c", ready)
    assert read_line(proc) == "ready"
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    # flock(1) took the lock and keeps the descriptor while its command runs.
    assert proc.pid in [h.pid for h in d.holders]
    assert d.holders[0].name == "flock"
    assert "with no usable owner record" in d.holder_summary()
    check_words(d)


def test_unknown_holder_plain_fcntl_and_record_naming_a_non_holder(
    lock: Path, holders: Holders
) -> None:
    proc = holders.hold(lock, record="none")
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert [h.pid for h in d.holders] == [proc.pid]
    # A record naming a live process (this one, start time and all) that does not hold it.
    write_record(lock, own_record())
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert [h.pid for h in d.holders] == [proc.pid]
    assert f"not by pid {os.getpid()}" in d.holder_summary()
    check_words(d)


def test_remote_record_is_never_judged(lock: Path) -> None:
    write_record(lock, own_record(pid=4242, hostname="build-7.elsewhere.invalid"))
    d = diagnose(lock)
    assert d.state is HolderState.REMOTE
    assert "build-7.elsewhere.invalid" in d.holder_summary()
    assert "build-7.elsewhere.invalid" in d.explain()
    check_words(d)


@pytest.mark.parametrize("holder", ["fcntl", "flock(1)"])
def test_remote_record_while_a_local_process_holds_is_an_unknown_holder(
    lock: Path, holders: Holders, holder: str
) -> None:
    """The kernel shows a holder here: the lock can be seen, so it is not REMOTE.

    The record names a pid on another host, which neither holds nor took the
    lock here: UNKNOWN_HOLDER, naming the local holder — in diagnose, scan
    and the errors an acquire raises. Its pid (1, alive here) is never
    looked up on this host.
    """
    proc = holders.hold(lock, record="none") if holder == "fcntl" else flock_holding(holders, lock)
    write_record(lock, own_record(pid=1, hostname="build-7.elsewhere.invalid"))
    (scanned,) = scan(lock.parent)
    for d in (diagnose(lock), scanned, *(e.holder for e in errors_meeting_a_holder(lock.parent))):
        assert d is not None
        assert d.state is HolderState.UNKNOWN_HOLDER, d.explain()
        assert [h.pid for h in d.holders] == [proc.pid]
        summary = d.holder_summary()
        assert summary.startswith(f"held by pid {proc.pid} (")
        assert "not by pid 1 on host build-7.elsewhere.invalid that its owner record names" in (
            summary
        )
        text = d.explain()
        assert f"pid {proc.pid} (" in text
        assert "Check on" not in text
        assert "Waiting is safe while it runs" in text
        check_words(d)
        assert "written on build-7.elsewhere.invalid, does not describe it" in text
    # Once the local holder is gone, the record is never judged from here ...
    holders.kill(proc)
    assert diagnose(lock).state is HolderState.REMOTE
    # ... and, as waiting was safe, an acquire here takes the lock and records itself.
    with PackLock(lock.parent).acquire(timeout=DEADLINE):
        d = diagnose(lock)
        assert d.state is HolderState.HELD
        assert [h.pid for h in d.holders] == [os.getpid()]


def test_remote_record_while_local_readers_hold_is_held_shared(
    lock: Path, holders: Holders
) -> None:
    readers = [holders.hold(lock, mode="sh", record="none") for _ in range(2)]
    write_record(lock, own_record(pid=4242, hostname="build-7.elsewhere.invalid"))
    d = diagnose(lock)
    assert d.state is HolderState.HELD
    assert d.shared
    assert sorted(h.pid for h in d.holders) == sorted(r.pid for r in readers)
    check_words(d)


def test_reused_pid_record_on_a_free_lock_is_stale(lock: Path) -> None:
    write_record(lock, own_record(create_time=psutil.Process().create_time() - 5000))
    d = diagnose(lock)
    assert d.state is HolderState.STALE_RECORD


def test_a_live_pid_holding_the_lock_under_a_record_with_another_start_is_no_heir(
    lock: Path, holders: Holders
) -> None:
    # The process with the recorded pid took the lock itself (it holds it, and
    # nothing inherited it): the record describes an earlier process with that
    # pid. It was not "inherited from pid X, which is gone" (trial item 8).
    proc = holders.hold(lock, record="wrong-start")
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert "another process" in d.note
    assert [h.pid for h in d.holders] == [proc.pid]
    summary = d.holder_summary()
    assert "inherited" not in summary
    assert f"held by pid {proc.pid} (" in summary
    assert f"not by pid {proc.pid} that" not in summary
    check_words(d)


def test_waiters_are_listed(lock: Path, holders: Holders) -> None:
    proc = holders.hold(lock)
    waiters = [holders.wait_for(lock) for _ in range(2)]
    d = diagnose(lock)
    assert d.state is HolderState.HELD
    assert sorted(w.pid for w in d.waiters) == sorted(p.pid for p in waiters)
    assert d.waiting_line() == f"2 waiting behind pid {proc.pid}"
    assert d.holder_summary().endswith("; 2 waiting")
    check_words(d)


def test_pack_lock_in_a_child_process(tmp_path: Path, holders: Holders) -> None:
    proc = holders.hold_with_library("PackLock", tmp_path)
    d = diagnose(tmp_path / ".grex-lock")
    assert d.state is HolderState.HELD
    assert [h.pid for h in d.holders] == [proc.pid]
    assert d.owner is not None
    assert d.owner["tier"] == 2
    assert d.owner["thread"] == "MainThread"
    with pytest.raises(LockBusy) as caught:
        PackLock(tmp_path).try_acquire()
    error = caught.value
    assert isinstance(error.holder, Diagnosis)
    assert error.holder.state is HolderState.HELD
    assert f"held by pid {proc.pid} (" in str(error)
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert str(again) == str(error)
    assert again.holder is not None


# -- without the kernel's table --------------------------------------------------


def test_no_kernel_table_is_never_free_and_held_only_when_the_holder_shows_it(
    lock: Path, holders: Holders
) -> None:
    # Another platform (no /proc/locks), or a table closed to this user: a lock
    # not seen held is UNREADABLE, saying what could not be seen (trial item 1).
    table = KernelLockTable.read("/nonexistent/proc/locks")
    assert not table.available
    held_by_flock = holders.hold(lock, record="none")
    for record in (None, own_record(), own_record(pid=2**40)):
        if record is not None:
            write_record(lock, record)
        d = diagnose(lock, table=table)
        assert d.state is HolderState.UNREADABLE, record
        assert not d.kernel_visible
        assert "/nonexistent/proc/locks" in d.note
        assert "whether the lock is held cannot be seen" in d.note
        text = d.explain()
        assert "free" not in text.replace("not reported free", "")
        assert "kernel's lock table" in text
        check_words(d)
    holders.kill(held_by_flock)
    # A holder whose own descriptors show the lock is seen without the table.
    proc = holders.hold(lock)
    d = diagnose(lock, table=table)
    assert d.state is HolderState.HELD
    assert [h.pid for h in d.holders] == [proc.pid]
    assert "Whether the lock is held is unknown" not in d.explain()
    check_words(d)


# -- hostile records ---------------------------------------------------------------


def _hostile(rng: random.Random) -> dict[str, bytes]:
    valid = json.dumps(own_record()).encode()
    records = {
        "random bytes": bytes(rng.getrandbits(8) for _ in range(4096)),
        "truncated JSON": valid[: len(valid) // 2],
        "10 MB": b'{"pid": 1, "create_time": 1.0, "x": "' + b"a" * 10_000_000 + b'"}',
        "wrong types": b'{"pid": "12", "create_time": [], "hostname": 5, "argv": "x"}',
        "bool pid": b'{"pid": true, "create_time": 1.0}',
        "JSON array": b"[1, 2, 3]",
        "NUL bytes": b'{"pid": 1\x00, "create_time": 1.0}\x00\x00',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "NaN start": b'{"pid": 1, "create_time": NaN, "acquired_at": Infinity}',
        "huge int": b'{"pid": 1' + b"0" * 4000 + b', "create_time": 1e308}',
        "garbage fields": json.dumps(
            own_record(thread=["x"], acquired_at="soon", argv=[None, 3], hostname=None)
        ).encode(),
    }
    for pid in (0, 1, -5, 2**40):
        records[f"pid {pid}"] = json.dumps(own_record(pid=pid)).encode()
    records["own pid"] = json.dumps(own_record()).encode()
    return records


HOSTILE = sorted(_hostile(random.Random(4)))


def _plant(lock: Path, name: str) -> None:
    record = Path(f"{lock}.owner")
    if name == "FIFO":
        os.mkfifo(record)
    elif name == "symlink":
        target = lock.parent / "elsewhere.json"
        target.write_text(json.dumps(own_record()))
        record.symlink_to(target)
    elif name == "directory":
        record.mkdir()
    else:
        record.write_bytes(_hostile(random.Random(4))[name])


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path)] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.parametrize("held", [False, True], ids=["free", "held"])
@pytest.mark.parametrize("name", [*HOSTILE, "FIFO", "symlink", "directory"])
def test_hostile_records_never_raise_hang_or_change_files(
    lock: Path, holders: Holders, name: str, held: bool
) -> None:
    _plant(lock, name)
    if held:
        holders.hold(lock, record="none")
    before = _snapshot(lock.parent)
    d = diagnose(lock)
    if held:
        expected = {HolderState.UNKNOWN_HOLDER, HolderState.ORPHANED, HolderState.HELD}
    else:
        expected = {HolderState.STALE_RECORD}
    assert d.state in expected
    check_words(d)
    (found,) = scan(lock.parent)
    assert found.state is d.state
    assert _snapshot(lock.parent) == before


def test_garbage_record_with_own_pid_while_held_names_the_real_holder(
    lock: Path, holders: Holders
) -> None:
    proc = holders.hold(lock, record="none")
    write_record(lock, own_record(pid=1))
    d = diagnose(lock)
    assert d.state is HolderState.UNKNOWN_HOLDER
    assert [h.pid for h in d.holders] == [proc.pid]


# -- no side effects --------------------------------------------------------------


def test_diagnose_never_takes_the_lock(tmp_path: Path, holders: Holders) -> None:
    """A diagnose storm never shows a third process a phantom holder, nor frees a real one."""
    lock = tmp_path / ".grex-lock"
    code = (
        "import sys; from grex_locks import PackLock, LockBusy\n"
        "lock = PackLock(sys.argv[1]); busy = 0\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        lock.try_acquire().release()\n"
        "    except LockBusy:\n"
        "        busy += 1\n"
        "print(busy, flush=True)\n"
    )
    trier = holders.spawn(sys.executable, "-c", code, str(tmp_path))
    assert read_line(trier) == "ready"
    stop = threading.Event()
    seen: list[HolderState] = []

    def storm() -> None:
        while not stop.is_set():
            seen.append(diagnose(lock).state)

    threads = [threading.Thread(target=storm)]
    for thread in threads:
        thread.start()
    try:
        assert trier.stdin is not None
        trier.stdin.write(b"go\n")
        assert read_line(trier) == "0"
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert seen
    # And a real holder keeps its lock through a storm of diagnoses.
    holder = holders.hold(lock)
    for _ in range(50):
        assert diagnose(lock).state is HolderState.HELD
    assert [h.pid for h in diagnose(lock).holders] == [holder.pid]


def test_holder_of_any_pid_never_raises() -> None:
    for pid in (0, 1, -5, 2**40, 2**22 + 1, os.getpid()):
        holder = Holder.of_pid(pid)
        assert holder is None or holder.pid == pid
    me = Holder.of_pid(os.getpid())
    assert me is not None
    assert me.status != "zombie"
    assert pickle.loads(pickle.dumps(me)) == me  # noqa: S301 - our own bytes
    hash(me)


# -- property: any JSON in a record ---------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        key: _JSON | st.integers(-(2**63), 2**63) | st.floats(allow_nan=True)
        for key in ("pid", "create_time", "hostname", "thread", "tier", "acquired_at", "argv")
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(owner=_FIELDS | _JSON)
def test_any_json_record_is_diagnosed_and_explained(tmp_path_factory: Any, owner: Any) -> None:
    """Whatever JSON a record holds, diagnose and every way of describing the result work."""
    lock = tmp_path_factory.mktemp("prop") / ".grex-lock"
    lock.touch()
    try:
        data = json.dumps(owner).encode()
    except ValueError:  # an int too long to print: then it cannot be in a record either
        return
    Path(f"{lock}.owner").write_bytes(data)
    d = diagnose(lock)
    assert d.state in (HolderState.STALE_RECORD, HolderState.REMOTE, HolderState.FREE)
    check_words(d)
    as_dict = owner if isinstance(owner, dict) else None
    me = Holder(os.getpid(), "python", ["python", "x.py"], "running", "root", 1.0)
    for state in HolderState:
        for shared in (False, True):
            fake = Diagnosis(lock, state, as_dict, holders=[me], waiters=[me], shared=shared)
            check_words(fake)
