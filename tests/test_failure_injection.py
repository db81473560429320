"""Failure injection: the OS refuses, or the user interrupts, at the worst moment.

Every scenario runs in a subprocess (its limits, mounts and signals must not
touch the test runner) that reports what it saw as one JSON line:

* descriptor exhaustion (``RLIMIT_NOFILE`` lowered, every descriptor used) →
  ``LockIOError`` on construct and acquire, nothing half-held, no descriptor
  leaked once the pressure is gone;
* no space, or a read-only file system, when the owner record is written
  (a private mount namespace with a tiny or read-only tmpfs) → the lock is
  taken without a record
  and the lock is *not* left held: another process takes it at once;
* ``KeyboardInterrupt`` at random points of acquire and release (an
  ``ITIMER_REAL`` storm whose handler raises inside library code only) →
  afterwards nothing in the registry, no tier held, no lock held, no record.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).with_name("failure_scripts")
#: Bound on each scenario subprocess; pytest-timeout backs it up.
SCENARIO_TIMEOUT = 50.0


def run_scenario(
    script: str, *args: str, prefix: tuple[str, ...] = (), timeout: float = SCENARIO_TIMEOUT
) -> dict[str, Any]:
    """Run ``failure_scripts/<script>`` with ``args``; return the JSON report it prints last."""
    result = subprocess.run(
        [*prefix, sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, f"scenario failed:\n{result.stdout}\n{result.stderr}"
    assert lines, f"scenario printed nothing:\n{result.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


# -- descriptor exhaustion ---------------------------------------------------------


@pytest.mark.parametrize("process", ["cold", "warm"])
def test_out_of_descriptors_fails_cleanly_or_holds_without_a_record(
    tmp_path: Path, process: str
) -> None:
    """``cold``: the process's first owner record is written out of descriptors.

    What needs a new descriptor (a lock file, a helper's private one) is a
    ``LockIOError`` with nothing half-held; a lock object whose lock file is
    open already takes its lock, without a record if the record needs one.
    """
    report = run_scenario("fd_exhaustion.py", str(tmp_path), process)
    assert report["problems"] == [], report
    outcomes = report["outcomes"]
    assert outcomes["construct"] == "LockIOError"
    assert outcomes["scheduler"] == "LockIOError"
    assert outcomes["acquire"] == "ok"
    assert outcomes["try_acquire"] == "ok"
    assert outcomes["wait_with_timeout"] == "LockIOError"
    assert outcomes["acquire_all"] == "ok"
    assert outcomes["recovered"] == "ok"
    assert report["fds_leaked"] == 0
    assert report["other_process_took_it"] is True


# -- no space, read-only -----------------------------------------------------------


def _private_tmpfs_works() -> str:
    """Why a private tmpfs cannot be mounted here ("" when it can)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is missing"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && '
         'mount -o remount,ro "$d" && umount "$d" && rmdir "$d"'],
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT,
        check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}"
    return ""


needs_private_tmpfs = pytest.mark.skipif(
    bool(_private_tmpfs_works()), reason=_private_tmpfs_works() or "available"
)


@needs_private_tmpfs
@pytest.mark.parametrize("failure", ["no_space", "read_only"])
@pytest.mark.parametrize("record_before", ["none", "empty", "stale"])
def test_a_refused_record_write_never_refuses_the_lock(
    tmp_path: Path, failure: str, record_before: str
) -> None:
    report = run_scenario(
        "record_refused.py",
        str(tmp_path),
        failure,
        record_before,
        prefix=("unshare", "-m", "--propagation", "private"),
    )
    assert report["problems"] == [], report
    assert report["acquire"] == "ok", report
    assert report["try_acquire"] == "ok", report
    assert report["other_process_took_it"] is True, report
    assert report["record_after"] in ("missing", "empty", "stale"), report
    if record_before != "stale":
        assert report["record_after"] != "stale", "a failed acquire left record content behind"
    assert report["temporary_files"] == [], "a failed record write left its temporary file"


# -- KeyboardInterrupt storms ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_keyboard_interrupt_anywhere_leaves_nothing_behind(tmp_path: Path) -> None:
    """Interrupts land inside acquire and release, waits included; afterwards all is clean.

    One interrupt per operation, as a person's Ctrl-C. The script's ``storm``
    mode (bursts of three, 30-300 us apart) is run by hand, not here: such
    bursts also break CPython's own ``threading.Condition`` ("release unlocked
    lock") and re-enter any Python unwinding at function entries, which no
    pure-Python library can mask (see README, "Interruptions").
    """
    report = run_scenario("interrupt_storm.py", str(tmp_path), "single", "6", "20240611")
    assert report["failures"] == [], json.dumps(report["failures"][:3], indent=1)
    assert report["interrupted"]["acquire"] >= 50, report
    # How many interrupts land in release depends on the machine's speed: a few suffice.
    assert report["interrupted"]["release"] >= 3, report
    assert report["iterations"] >= 200, report
    assert report["fresh_process_took_all"] is True, report


#: The sweeps of interrupt_each_place.py: an operation, and what the rival does meanwhile.
EACH_PLACE_SCENARIOS = (
    "pack",  # uncontended acquire and release
    "pack-timeout",  # another process holds it: the wait in the kernel, a helper thread
    "pack-cancel",  # the same, ended by a cancel event: a watcher thread too
    "pack-thread",  # another thread of this process holds it: the in-process gate
    "pack-busy",  # try_acquire refused: the shared diagnosis of the holder
    "read-timeout",
    "write",
    "group-timeout",  # acquire_all, the second pack held by another process
    "permit-timeout",  # a scheduler slot held by another process
    "permit-thread",  # a scheduler permit held by another thread
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_interrupt_at_each_place_in_turn_leaves_nothing_behind(tmp_path: Path) -> None:
    """A KeyboardInterrupt at every place a signal handler can run, one run each.

    Where the storm above lands at random, this sweep interrupts an operation
    at its 1st, 2nd, ... place where CPython may run a signal handler (a
    function's entry, a call's return, a loop's jump back), in grex_locks and
    in what it calls, until the operation runs out of places. After each
    run the same operation, against a rival that lets go only once it
    waits, must be granted; and no place, tier, thread, signal mask, lock
    or record may be left. Found: a helper thread whose start was
    interrupted, left behind and taken over by the next wait, which then
    waited forever; a thread left blocking every signal; a shared
    diagnosis left in progress, which made every later refusal wait 1 s and
    name nobody. The scenarios run two at a time (each is its own process).
    """
    running: dict[str, subprocess.Popen[str]] = {}
    reports: dict[str, dict[str, Any]] = {}
    pending = list(EACH_PLACE_SCENARIOS)

    def finish(name: str) -> None:
        process = running.pop(name)
        stdout, stderr = process.communicate(timeout=SCENARIO_TIMEOUT * 4)
        assert process.returncode == 0, f"{name} failed:\n{stdout}\n{stderr[-3000:]}"
        reports[name] = json.loads(stdout.strip().splitlines()[-1])

    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            root = tmp_path / name
            root.mkdir()
            running[name] = subprocess.Popen(
                [sys.executable, str(SCRIPTS / "interrupt_each_place.py"), str(root), name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        finish(next(iter(running)))
    unsupported = [str(r["unsupported"]) for r in reports.values() if "unsupported" in r]
    if unsupported:
        pytest.skip(unsupported[0])
    for name, report in reports.items():
        assert report["failures"] == [], f"{name}: " + json.dumps(report["failures"][:3], indent=1)
        assert report["watchers_left"] == [], (name, report)
        assert report["fresh_process_took_all"] is True, (name, report)
        # Every operation has places to interrupt (a sweep of none tests nothing).
        assert report["places"] >= 50, (name, report)


# -- a churning kernel lock table ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_diagnose_sees_a_held_lock_while_the_kernel_lock_table_churns(tmp_path: Path) -> None:
    """A lock held all along is HELD in every diagnosis, however busy /proc/locks is.

    Found by the chaos run: ``/proc/locks`` is produced a page at a time, so a
    table longer than a page that changes between two reads can skip the
    held lock's line, and the diagnosis then says FREE or STALE_RECORD.
    """
    report = run_scenario("lock_table_churn.py", str(tmp_path), "4")
    assert report["diagnoses"] > 50, report
    assert report["states"] == {"HELD": report["diagnoses"]}, report
