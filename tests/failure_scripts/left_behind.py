"""What an interrupted operation may have left, and forcing it free (both interrupt scripts).

Imported by ``interrupt_storm.py`` and ``interrupt_each_place.py`` (each run
as a script, so this directory is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grex_locks import _holder_errors, scheduler
from grex_locks._core import lock_file, tiers
from grex_locks._core.fair_queue import queues_in_use
from grex_locks._core.owner_record import record_path
from grex_locks._core.tiers import held_tiers


def files_left(files: Iterable[Path]) -> list[str]:
    """What another process would find: a lock file still locked, a record with content.

    A new open file description (this process's, but flock treats it as
    anyone else's) must get the lock at once.
    """
    found = []
    for path in files:
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found.append(f"{path} is still locked in the kernel")
        finally:
            os.close(fd)
        record = record_path(path)
        if record.exists() and record.read_bytes().strip():
            found.append(f"{record} has content: {record.read_bytes()[:120]!r}")
    return found


def unfinished_diagnoses() -> int:
    """Diagnoses left in progress: later refusals of their lock would wait for them."""
    return len([d for d in _holder_errors._in_progress.values() if not d.finished])


def kept_in_process(locks: Iterable[Any], permits: Any) -> list[str]:
    """What this process still keeps: gate places, tiers, diagnoses, holds, permits counted."""
    found = []
    if queues_in_use():
        found.append(f"{queues_in_use()} gate entries left")
    if held_tiers():
        found.append(f"tiers {held_tiers()} still held")
    if unfinished_diagnoses():
        # Every later refusal of that lock would wait for it, and name nobody.
        found.append(f"{unfinished_diagnoses()} diagnoses left in progress")
    for lock in locks:
        if lock.held:
            found.append(f"{lock.path} still held by its object")
    in_use = permits.statistics().permits_out
    if in_use:
        found.append(f"{in_use} scheduler permits still counted in use")
    return found


def force_free(files: Iterable[Path], cores: Iterable[Any]) -> None:
    """Force everything free after a failure, so that later runs are judged afresh.

    ``cores`` are the lock objects' cores: they renew themselves (forget
    their holds and places) on next use, as in a forked child.
    """
    for fd in lock_file.owned_descriptors():
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    for core in cores:
        core._generation = -1
        core.queue._generation = -1
    scheduler.reset_all_after_fork()
    tiers.reset_after_fork()
    for diagnosing in _holder_errors._in_progress.values():
        diagnosing.done.set()
    _holder_errors._in_progress.clear()
    for path in files:
        record = record_path(path)
        if record.exists():
            record.write_bytes(b"")
