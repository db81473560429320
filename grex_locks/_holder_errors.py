"""The errors a caller sees when a lock was not granted, each naming the holder.

The core (:mod:`grex_locks._core`) only answers "granted or not"; it never
diagnoses, since diagnostics sit above it. This public-layer module turns a
refusal into ``LockBusy`` / ``LockTimeout`` / ``LockCancelled`` with a
diagnosis of who holds the lock, and gives the core's slow-wait log lines the
same description of the holder.
"""

from __future__ import annotations

import time
from pathlib import Path

from ._core import slow_waits
from ._core.lock_file import FileKey
from ._core.waiting import CancelEvent, is_cancelled
from ._diagnostics.diagnose import diagnose, diagnose_busy
from ._diagnostics.diagnosis import Diagnosis
from .errors import LockBusy, LockCancelled, LockTimeout


def holder_of(path: Path, key: FileKey) -> Diagnosis | None:
    """Best-effort diagnosis for an error message; an error must not fail to build."""
    try:
        return diagnose_busy(path, key)
    except Exception:  # noqa: BLE001 - a diagnosis is a courtesy, never a second failure
        return None


def refusal(
    *,
    what: str,
    path: Path | None,
    wait: bool,
    started: float,
    cancel: CancelEvent | None,
    holder: Diagnosis | None,
    busy_error: type[LockBusy] = LockBusy,
) -> LockBusy | LockTimeout | LockCancelled:
    """The error for an acquire of ``what`` that was not granted: busy, cancelled or timed out.

    ``what`` names the lock for a person ("pack lock /ws/a/.grex-lock").
    """
    waited = time.monotonic() - started
    if wait and is_cancelled(cancel):
        return LockCancelled(path, f"waiting for {what} was cancelled after {waited:.3f} s")
    summary = holder.holder_summary() if holder is not None else ""
    clause = f": {summary}" if summary else ""
    if not wait:
        return busy_error(path, f"{what} is busy{clause}", holder)
    return LockTimeout(
        path, f"timed out after {waited:.3f} s waiting for {what}{clause}", holder, waited
    )


def _describe_for_slow_wait(path: Path) -> str:
    return diagnose(path).holder_summary() or "holder unknown"


slow_waits.describe_holders_with(_describe_for_slow_wait)
