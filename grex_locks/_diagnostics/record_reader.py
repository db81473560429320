"""Reading an owner record without trusting it: the diagnostics' side of the record.

A record is information written by whoever held the lock; it may be empty,
torn, garbage, huge, a symlink or a FIFO. Reading never follows a symlink,
never blocks on a FIFO, reads at most :data:`MAX_RECORD_BYTES`, and never
raises.
"""

from __future__ import annotations

import enum
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grex_locks._core.owner_record import record_path

#: Diagnostics read at most this much of a record; anything larger is garbage.
MAX_RECORD_BYTES = 64 * 1024


class RecordStatus(enum.Enum):
    """What sat at a record path when it was read."""

    MISSING = "missing"
    EMPTY = "empty"
    VALID = "valid"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class RecordRead:
    """The outcome of reading a record: its status, the parsed dict, and why not."""

    status: RecordStatus
    owner: dict[str, Any] | None = None
    problem: str = ""


def parse_record(data: bytes) -> RecordRead:
    """Parse record bytes: a JSON object with int pid and numeric create_time, or unreadable."""
    if not data.strip():
        return RecordRead(RecordStatus.EMPTY)
    try:
        owner = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return RecordRead(RecordStatus.UNREADABLE, problem="not JSON")
    if not isinstance(owner, dict):
        return RecordRead(RecordStatus.UNREADABLE, problem="not a JSON object")
    pid = owner.get("pid")
    created = owner.get("create_time")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return RecordRead(RecordStatus.UNREADABLE, owner, "no integer pid")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        return RecordRead(RecordStatus.UNREADABLE, owner, "no numeric create_time")
    return RecordRead(RecordStatus.VALID, owner)


def read_record(lock_path: Path) -> RecordRead:  # noqa: PLR0911 - one return per verdict  # noqa: PLR0911 - one return per verdict
    """Read the owner record of ``lock_path`` without trusting it or changing anything.

    Only a regular file is read (never through a symlink, never a FIFO or a
    device), and at most :data:`MAX_RECORD_BYTES` of it. Never raises.
    """
    target = record_path(lock_path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return RecordRead(RecordStatus.MISSING)
    except OSError as exc:
        return RecordRead(RecordStatus.UNREADABLE, problem=exc.strerror or str(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return RecordRead(RecordStatus.UNREADABLE, problem="not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            return RecordRead(RecordStatus.UNREADABLE, problem=f"too large ({st.st_size} bytes)")
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError as exc:
        return RecordRead(RecordStatus.UNREADABLE, problem=exc.strerror or str(exc))
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        return RecordRead(RecordStatus.UNREADABLE, problem="too large")
    return parse_record(data)
