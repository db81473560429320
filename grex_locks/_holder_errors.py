"""The errors a caller sees when a lock was not granted, each naming the holder.

The core (:mod:`grex_locks._core`) only answers "granted or not"; it never
diagnoses, since diagnostics sit above it. This public-layer module turns a
refusal into ``LockBusy`` / ``LockTimeout`` / ``LockCancelled`` with a
diagnosis of who holds the lock, and gives the core's slow-wait log lines the
same description of the holder.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ._core import slow_waits
from ._core.lock_file import FileKey
from ._core.owner_record import record_path
from ._core.waiting import CancelEvent, Wake, is_cancelled
from ._diagnostics.diagnose import diagnose, diagnose_busy
from ._diagnostics.diagnosis import Diagnosis, HolderState
from ._diagnostics.kernel_lock_table import ProcessFiles
from ._diagnostics.record_reader import RecordRead, read_record_at
from .errors import LockBusy, LockCancelled, LockTimeout

#: How long a refused thread waits for a diagnosis another thread is making
#: of the same lock file, before it gives up on naming the holder.
_SHARED_DIAGNOSIS_WAIT = 1.0


class _Diagnosing:
    """A diagnosis of one lock file in progress in this process, for others to share."""

    __slots__ = ("done", "finished", "result")

    def __init__(self) -> None:
        self.done = Wake()
        #: Set first thing when the diagnosing thread is done, with no call
        #: before it where a Ctrl-C could land: an entry left behind by an
        #: interruption is then seen as over, and replaced.
        self.finished = False
        self.result: Diagnosis | None = None


_in_progress_mutex = threading.Lock()
_in_progress: dict[FileKey, _Diagnosing] = {}


def _renew_in_progress() -> None:
    global _in_progress_mutex  # noqa: PLW0603 - a parent thread may have held it at the fork
    _in_progress_mutex = threading.Lock()
    _in_progress.clear()


os.register_at_fork(after_in_child=_renew_in_progress)


def holder_of(path: Path, key: FileKey) -> Diagnosis | None:
    """Best-effort diagnosis for an error message; an error must not fail to build.

    Threads refused the same lock at once (forty waiters whose timeouts
    end together) share one diagnosis, begun by the first of them, instead
    of making forty in a row under the interpreter lock: the last would
    return long after its deadline. The shared one is as recent as the
    refusal.
    """
    mine = _Diagnosing()
    try:
        with _in_progress_mutex:
            current = _in_progress.get(key)
            if current is None or current.finished:
                _in_progress[key] = current = mine
        if current is not mine:
            current.done.wait(_SHARED_DIAGNOSIS_WAIT)
            return current.result
        try:
            mine.result = diagnose_busy(path, key)
        except Exception:  # noqa: BLE001 - a diagnosis is a courtesy, never a second failure
            mine.result = None
        return mine.result
    finally:
        mine.finished = True
        mine.done.set()
        with _in_progress_mutex:
            if _in_progress.get(key) is mine:
                del _in_progress[key]


#: How long a diagnosis for an error took lately, in this process (seconds): the
#: head start an early one needs (see EarlyDiagnosis.lead).
_recent_diagnosis = [0.0025]


class EarlyDiagnosis:
    """The holder of a lock diagnosed while a wait for it runs out, for its timeout error.

    Passed as a wait's ``near_deadline`` (see :func:`._core.waiting.wait_for`):
    diagnosing after the deadline would make the timeout late by as long as
    that takes (2-3 ms on a quiet machine, on caches gone cold in the wait;
    10 ms and more on a busy one). So it starts :attr:`lead` seconds early,
    twice what diagnoses took lately. At the deadline, :meth:`holder` gives
    that diagnosis only while it is still true, and diagnoses afresh
    otherwise: the lock is held exclusively (a shared lock can gain readers
    unseen), the owner record is byte for byte the one read before it (a
    holder blanks its record before it lets go, a new hold writes a new
    ``acquired_at``), and every holder it named still holds the lock (a
    recorded holder killed while its child keeps the lock is gone).
    """

    __slots__ = ("_key", "_path", "_record", "_result")

    def __init__(self, path: Path, key: FileKey) -> None:
        self._path = path
        self._key = key
        #: The record as read just before the early diagnosis (None: not made yet).
        self._record: RecordRead | None = None
        self._result: Diagnosis | None = None

    @property
    def lead(self) -> float:
        """Seconds before the deadline to begin: twice a recent diagnosis, 5 to 50 ms."""
        return min(0.05, max(0.005, 2 * _recent_diagnosis[0]))

    def __call__(self) -> None:
        if self._record is not None:  # a wait in the queue, then one in the kernel: once
            return
        began = time.monotonic()
        self._record = read_record_at(record_path(self._path))
        self._result = holder_of(self._path, self._key)
        # Smoothed, so that one slow diagnosis does not set every later lead.
        _recent_diagnosis[0] += (time.monotonic() - began - _recent_diagnosis[0]) / 4

    def holder(self) -> Diagnosis | None:
        """The diagnosis for an error now: the early one if it still holds, else a new one."""
        early, before = self._result, self._record
        if early is not None and before is not None and self._still_true(early, before):
            return early
        return holder_of(self._path, self._key)

    def _still_true(self, early: Diagnosis, before: RecordRead) -> bool:
        if early.shared or not early.holders or early.state not in _HELD_STATES:
            return False
        if not read_record_at(record_path(self._path)).same_as(before):
            return False
        files = ProcessFiles()
        return all(files.holds(holder.pid, self._key) is True for holder in early.holders)


#: The states of a held lock whose diagnosis names the holders (see EarlyDiagnosis).
_HELD_STATES = frozenset({HolderState.HELD, HolderState.ORPHANED, HolderState.UNKNOWN_HOLDER})


def refusal(
    *,
    what: str,
    path: Path | None,
    wait: bool,
    started: float,
    cancel: CancelEvent | None,
    holder: Callable[[], Diagnosis | None],
    busy_error: type[LockBusy] = LockBusy,
) -> LockBusy | LockTimeout | LockCancelled:
    """The error for an acquire of ``what`` that was not granted: busy, cancelled or timed out.

    ``what`` names the lock for a person ("pack lock /ws/a/.grex-lock");
    ``holder`` diagnoses its holder, called only for an error that names one
    (a cancelled wait does not, and returns without the cost).
    """
    waited = time.monotonic() - started
    if wait and is_cancelled(cancel):
        return LockCancelled(path, f"waiting for {what} was cancelled after {waited:.3f} s")
    diagnosis = holder()
    summary = diagnosis.holder_summary() if diagnosis is not None else ""
    clause = f": {summary}" if summary else ""
    if not wait:
        return busy_error(path, f"{what} is busy{clause}", diagnosis)
    return LockTimeout(
        path, f"timed out after {waited:.3f} s waiting for {what}{clause}", diagnosis, waited
    )


def _describe_for_slow_wait(path: Path) -> str:
    return diagnose(path).holder_summary() or "holder unknown"


slow_waits.describe_holders_with(_describe_for_slow_wait)
