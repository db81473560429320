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
    report = run_scenario("interrupt_storm.py", str(tmp_path), "single", "8", "20240611")
    assert report["failures"] == [], json.dumps(report["failures"][:3], indent=1)
    assert report["interrupted"]["acquire"] >= 50, report
    # How many interrupts land in release depends on the machine's speed: a few suffice.
    assert report["interrupted"]["release"] >= 3, report
    assert report["iterations"] >= 200, report
    assert report["fresh_process_took_all"] is True, report


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
