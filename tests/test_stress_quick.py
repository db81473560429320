"""The chaos run's short mode, in the default test run, so a regression is caught at every change.

``scripts/stress.py --quick`` runs worker processes (spawn and fork) over
random legal chains of the five locks while a killer SIGKILLs, SIGSTOPs and
SIGCONTs them, and checks mutual exclusion, that no acknowledged manifest
append is lost, that no wait passes its deadline, and that ``scan()`` agrees
with the kernel. A second run breaks the OS lock on purpose, to show that
those checks can fail at all.
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


@pytest.mark.timeout(120)
def test_quick_chaos_run_finds_no_violation() -> None:
    status, output, totals = run_stress("--quick", "--duration", "25", timeout=110)
    assert status == 0, output[-8000:]
    assert totals["violations"] == 0, output[-8000:]
    assert totals["kills"] > 0
    assert totals["stops"] > 0
    assert totals["operations"] > 100


@pytest.mark.timeout(60)
def test_chaos_run_catches_a_broken_lock() -> None:
    status, output, totals = run_stress(
        "--quick", "--duration", "4", "--sabotage", "--seed", "1", timeout=50
    )
    assert status == 1, output[-8000:]
    assert totals["violations"] > 0
    assert "mutual exclusion broken" in output
