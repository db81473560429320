"""Reading an owner record without trusting it: the diagnostics' side of the record.

A record is information written by whoever held the lock; it may be empty,
torn, garbage, huge, a symlink or a FIFO. Reading never follows a symlink,
never blocks on a FIFO, reads at most :data:`MAX_RECORD_BYTES`, and never
raises.

The format, as grex_locks writes it (the core's writer computes the same
thing independently)::

    {"pid":4242,"create_time":...,"acquired_at":...,"check":"1a2b3c4d"}<spaces>

One JSON object, then optional ASCII whitespace: the file is overwritten in
place, padded with spaces over older, longer text, and cleared by
overwriting it with spaces. Empty or whitespace-only means no record. A
record written by grex_locks ends with the member ``"check":"xxxxxxxx"``
(eight lowercase hex digits): ``format(zlib.crc32(before), "08x")`` where
``before`` is the exact bytes from the opening ``{`` up to, not including,
the ``,"check":`` that starts that last member (:func:`encode_check`).
Because the file is overwritten in place, a read can catch a write half
done; text that is not JSON, or a check that does not match, is read again
a few times before the record is called unreadable. A record without a
``"check"`` member (another writer's) is taken as it is.
"""

from __future__ import annotations

import enum
import errno
import json
import math
import os
import stat
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grex_locks._core.owner_record import record_path

#: Diagnostics read at most this much of a record; anything larger is garbage.
MAX_RECORD_BYTES = 64 * 1024
#: How many times, at most, a record that looks torn (a write caught half done) is read.
READ_ATTEMPTS = 5

#: What starts the check member, which is always the record's last.
CHECK_MEMBER = b',"check":'
_CHECK_TAIL = len(b',"check":"01234567"}')
_HEX = frozenset(b"0123456789abcdef")
#: ASCII whitespace as ``bytes.strip`` knows it, which is what the writer pads with.
_PADDING = b" \t\n\r\x0b\x0c"


def encode_check(before: bytes) -> bytes:
    """The check of a record whose text before ``,"check":`` is ``before``: 8 lowercase hex."""
    return b"%08x" % zlib.crc32(before)


# Why bytes that were read are no owner record (a RecordRead's ``problem``);
# any other problem says the bytes could not be read at all.
NOT_JSON = "not JSON"
NOT_AN_OBJECT = "not a JSON object"
CHECK_MISMATCH = "its check does not match its text"
NO_PID = "no integer pid"
NO_CREATE_TIME = "no finite numeric create_time"
TOO_LARGE = "too large"


def is_content_problem(problem: str) -> bool:
    """Whether ``problem`` says what was read is no record (else: nothing could be read)."""
    return problem.startswith(TOO_LARGE) or problem in (
        NOT_JSON,
        NOT_AN_OBJECT,
        CHECK_MISMATCH,
        NO_PID,
        NO_CREATE_TIME,
    )


class RecordStatus(enum.Enum):
    """What sat at a record path when it was read."""

    MISSING = "missing"
    EMPTY = "empty"
    VALID = "valid"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class RecordRead:
    """The outcome of reading a record: its status, the parsed dict, and why not.

    ``file_type`` names what sits at the record path when it is not a regular
    file (``"directory"``, ``"symlink"``, ``"FIFO"``, ``"socket"``,
    ``"device"``), else ``""``. ``torn`` says the bytes may be a write caught
    half done (not JSON, or a check that does not match): worth reading again.
    ``uid`` is the record file's owner (``-1`` when it is not a regular file);
    ``data`` the bytes read (empty when none were); ``key`` the identity
    ``(st_dev, st_ino)`` of the regular file read (``None`` when none was).
    """

    status: RecordStatus
    owner: dict[str, Any] | None = None
    problem: str = ""
    file_type: str = ""
    torn: bool = False
    uid: int = -1
    data: bytes = b""
    key: tuple[int, int] | None = None

    def same_as(self, other: RecordRead) -> bool:
        """Whether ``other`` read the very same thing: same kind of file, byte for byte.

        A dead holder's record never changes; a live holder's is blanked
        before each release and written anew (a new ``acquired_at``) at
        each hold, so two reads alike across a look at the kernel's table
        saw no hold begin or end in between.
        """
        return (self.status, self.file_type, self.problem, self.data) == (
            other.status,
            other.file_type,
            other.problem,
            other.data,
        )


def _check_matches(body: bytes, owner: dict[str, Any]) -> bool:
    """Whether the record ``body`` (stripped) ends with a check member that matches its text."""
    value = owner.get("check")
    if not isinstance(value, str) or len(body) < _CHECK_TAIL:
        return False
    tail = body[-_CHECK_TAIL:]
    digits = tail[len(CHECK_MEMBER) + 1 : -2]
    if not (
        tail.startswith(CHECK_MEMBER + b'"')
        and tail.endswith(b'"}')
        and set(digits) <= _HEX
        and digits.decode("ascii") == value
    ):
        return False
    return encode_check(body[:-_CHECK_TAIL]) == digits


def parse_record(data: bytes) -> RecordRead:  # noqa: PLR0911 - one return per verdict
    """Parse record bytes: a JSON object with int pid and finite numeric create_time, or unreadable.

    A record carrying a ``"check"`` member is valid only if the check matches
    (see the module docstring); otherwise it is unreadable and ``torn``.
    """
    body = data.strip(_PADDING)
    if not body:
        return RecordRead(RecordStatus.EMPTY)
    try:
        owner = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return RecordRead(RecordStatus.UNREADABLE, problem=NOT_JSON, torn=True)
    if not isinstance(owner, dict):
        return RecordRead(RecordStatus.UNREADABLE, problem=NOT_AN_OBJECT)
    if "check" in owner and not _check_matches(body, owner):
        return RecordRead(RecordStatus.UNREADABLE, owner, CHECK_MISMATCH, torn=True)
    pid = owner.get("pid")
    created = owner.get("create_time")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return RecordRead(RecordStatus.UNREADABLE, owner, NO_PID)
    if not _finite_number(created):
        return RecordRead(RecordStatus.UNREADABLE, owner, NO_CREATE_TIME)
    return RecordRead(RecordStatus.VALID, owner)


def _finite_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def file_type_of(mode: int) -> str:
    """``""`` for a regular file, else what the file is: ``"directory"``, ``"symlink"``..."""
    if stat.S_ISREG(mode):
        return ""
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "device"


def os_problem(exc: OSError) -> str:
    """An ``OSError`` as a short phrase naming its errno: ``permission denied (EACCES)``."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = (exc.strerror or str(exc)).lower()
    return f"{text} ({name})" if name else text


def read_record_once(target: Path | str, dir_fd: int | None = None) -> RecordRead:  # noqa: PLR0911 - one return per verdict
    """Read the record file ``target`` (relative to ``dir_fd``, if given) once, never following."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(target, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return RecordRead(RecordStatus.MISSING)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return RecordRead(RecordStatus.UNREADABLE, problem="a symlink", file_type="symlink")
        try:
            mode = os.stat(target, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            mode = stat.S_IFREG
        kind = file_type_of(mode)
        problem = f"a {kind}" if kind else os_problem(exc)
        return RecordRead(RecordStatus.UNREADABLE, problem=problem, file_type=kind)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = file_type_of(st.st_mode)
            return RecordRead(RecordStatus.UNREADABLE, problem=f"a {kind}", file_type=kind)
        if st.st_size > MAX_RECORD_BYTES:
            return RecordRead(RecordStatus.UNREADABLE, problem=f"{TOO_LARGE} ({st.st_size} bytes)")
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError as exc:
        return RecordRead(RecordStatus.UNREADABLE, problem=os_problem(exc))
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        return RecordRead(RecordStatus.UNREADABLE, problem=TOO_LARGE)
    return replace(parse_record(data), uid=st.st_uid, data=data, key=(st.st_dev, st.st_ino))


def read_record(lock_path: Path) -> RecordRead:
    """Read the owner record of ``lock_path`` without trusting it or changing anything.

    Only a regular file is read (never through a symlink, never a FIFO or a
    device), and at most :data:`MAX_RECORD_BYTES` of it. A record that looks
    torn is read again at once (yielding the CPU in between), up to
    :data:`READ_ATTEMPTS` times in all. Never raises.
    """
    return read_record_at(record_path(lock_path))


def read_record_at(target: Path) -> RecordRead:
    """Read the record file ``target`` itself (see :func:`read_record`)."""
    read = read_record_once(target)
    for _ in range(READ_ATTEMPTS - 1):
        if not read.torn:
            break
        # Not a sleep: lets a writer preempted on this CPU finish its write.
        os.sched_yield()
        read = read_record_once(target)
    return read
