"""The chaos run's short mode, in the default test run, so a regression is caught at every change.

``scripts/stress.py --quick`` runs worker processes (spawn and fork) over
random legal chains of the locks while a killer SIGKILLs, SIGSTOPs and
SIGCONTs them; the workers fork children while holding, run ``fork`` process
pools under a held lock and hand held descriptors to child programs. It
checks mutual exclusion, that a forked child never releases its parent's
lock nor changes its record, that no acknowledged manifest append is lost,
that no wait passes its deadline, and that every diagnosis is exact. Two
more runs break things on purpose — the OS lock, and a forked child that
unlocks its parent's lock — to show that those checks can fail at all.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

STRESS = Path(__file__).resolve().parents[1] / "scripts" / "stress.py"


def run_stress(*args: str, timeout: float) -> tuple[int, str, dict[str, int]]:
    """Run the chaos script; return its exit status, its output and its totals."""
    result = subprocess.run(
        [sys.executable, str(STRESS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    totals = {
        match["name"]: int(match["value"])
        for match in re.finditer(r"^(?P<name>[a-z]+)\s+(?P<value>\d+)", result.stdout, re.M)
    }
    return result.returncode, output, totals


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_chaos_run_finds_no_violation() -> None:
    status, output, totals = run_stress("--quick", "--duration", "10", timeout=100)
    assert status == 0, output[-8000:]
    assert totals["violations"] == 0, output[-8000:]
    assert totals["misses"] == 0, output[-8000:]
    assert totals["kills"] > 0
    assert totals["stops"] > 0
    assert totals["operations"] > 100
    assert totals["forks"] > 0
    assert totals["pools"] > 0
    assert totals["inheritors"] > 0
    assert totals["exact"] > 50


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_chaos_run_catches_a_broken_lock() -> None:
    status, output, totals = run_stress(
        "--quick", "--duration", "4", "--sabotage", "--seed", "1", timeout=50
    )
    assert status == 1, output[-8000:]
    assert totals["violations"] > 0
    assert "mutual exclusion broken" in output


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_chaos_run_catches_a_child_that_unlocks_its_parent() -> None:
    status, output, totals = run_stress(
        "--quick", "--duration", "4", "--sabotage", "fork", "--seed", "1", timeout=50
    )
    assert status == 1, output[-8000:]
    assert totals["violations"] > 0
    assert "inherited hold released" in output
