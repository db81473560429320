"""Property tests for the parsers of untrusted input: they never raise, whatever they are fed.

* ``record_reader.parse_record`` on arbitrary bytes and arbitrary JSON: never
  raises, and says VALID exactly when the record is a JSON object with an
  integer ``pid`` and a finite numeric ``create_time`` (and, when it carries
  a ``"check"`` member, a check that matches its text).
* ``kernel_locks.parse_line`` (one ``/proc/locks`` line) and
  ``KernelLockTable.parse`` on arbitrary text: never raise, and read real
  lines correctly.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grex_locks._diagnostics.record_reader import RecordStatus, encode_check, parse_record

# -- parsers of untrusted input ---------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except (TypeError, OverflowError):
        return False


def _valid_shape(owner: dict[str, Any]) -> bool:
    pid, created = owner.get("pid"), owner.get("create_time")
    return (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and isinstance(created, (int, float))
        and not isinstance(created, bool)
        and _finite(created)
        and "check" not in owner
    )


def _check_record(data: bytes) -> None:
    read = parse_record(data)
    assert isinstance(read.status, RecordStatus)
    if read.status is RecordStatus.VALID:
        assert isinstance(read.owner, dict)
        assert _valid_shape(read.owner)
    if read.status is RecordStatus.EMPTY:
        assert not data.strip()


@given(st.binary(max_size=4096))
def test_parse_record_never_raises_on_bytes(data: bytes) -> None:
    _check_record(data)


@given(JSON)
def test_parse_record_never_raises_on_json(value: Any) -> None:
    _check_record(json.dumps(value).encode())


@given(
    pid=JSON,
    create_time=JSON | st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 1e308]),
    extra=st.dictionaries(st.text(max_size=10), JSON, max_size=4),
)
def test_parse_record_is_valid_exactly_with_int_pid_and_finite_create_time(
    pid: Any, create_time: Any, extra: dict[str, Any]
) -> None:
    owner = {**extra, "pid": pid, "create_time": create_time}
    read = parse_record(json.dumps(owner).encode())
    assert (read.status is RecordStatus.VALID) == _valid_shape(owner)


@given(
    owner=st.dictionaries(st.text(max_size=10), JSON, max_size=6),
    pid=st.integers(-(2**63), 2**63),
    create_time=st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40),
    padding=st.text(alphabet=" \t\n\r", max_size=200),
    flip=st.integers(0, 10_000),
)
def test_parse_record_with_check_accepts_exactly_the_unaltered_text(
    owner: dict[str, Any], pid: int, create_time: float, padding: str, flip: int
) -> None:
    """A record closed by its check parses VALID, padded or not; any altered byte is caught."""
    owner = {k: v for k, v in owner.items() if k != "check"}
    owner.update(pid=pid, create_time=create_time)
    before = json.dumps(owner, separators=(",", ":"))[:-1].encode()
    record = before + b',"check":"' + encode_check(before) + b'"}'
    assert encode_check(before) == b"%08x" % zlib.crc32(before)
    read = parse_record(record + padding.encode())
    assert read.status is RecordStatus.VALID
    assert read.owner is not None
    assert read.owner["pid"] == pid
    # One byte changed anywhere in the text before the check: never VALID.
    index = flip % len(before)
    changed = bytearray(record)
    changed[index] = (changed[index] + 1) % 128 or 1
    assert parse_record(bytes(changed)).status is not RecordStatus.VALID


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"a":' * 100_000, b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"\x00" * 64, b" \n\t "],
    ids=["deep-list", "deep-object", "utf16", "bom", "nul", "blank"],
)
def test_parse_record_survives_hostile_records(data: bytes) -> None:
    _check_record(data)


kernel_locks = pytest.importorskip("grex_locks._diagnostics.kernel_lock_table")

#: Realistic /proc/locks fields, to build lines the parser must understand.
LINE_PARTS = st.fixed_dictionaries(
    {
        "id": st.integers(1, 10**6),
        "arrows": st.integers(0, 2),
        "kind": st.sampled_from(["FLOCK", "POSIX", "OFDLCK", "LEASE", "DELEG"]),
        "flavour": st.sampled_from(["ADVISORY", "MANDATORY", "ACTIVE", "BREAKING", "UNKNOWN"]),
        "mode": st.sampled_from(["WRITE", "READ", "UNLCK", "RW", "NONE"]),
        "pid": st.integers(-1, 2**22),
        "major": st.integers(0, 0xFFF),
        "minor": st.integers(0, 0xFFFFF),
        "ino": st.integers(0, 2**64 - 1),
        "range": st.sampled_from(["0 EOF", "0 9223372036854775807", "100 200", ""]),
    }
)


def _line(p: dict[str, Any]) -> str:
    arrows = "-> " * p["arrows"]
    return (
        f"{p['id']}: {arrows}{p['kind']}  {p['flavour']}  {p['mode']} {p['pid']} "
        f"{p['major']:02x}:{p['minor']:02x}:{p['ino']} {p['range']}"
    ).rstrip()


@given(st.text(max_size=300))
def test_proc_locks_line_parser_never_raises(line: str) -> None:
    parsed = kernel_locks.parse_line(line)
    assert parsed is None or isinstance(parsed, kernel_locks.KernelLock)


@given(st.lists(st.text(max_size=120) | LINE_PARTS.map(_line), max_size=20))
def test_proc_locks_table_parser_never_raises(lines: list[str]) -> None:
    table = kernel_locks.KernelLockTable.parse("\n".join(lines))
    assert len(table) <= len(lines)


@given(LINE_PARTS)
def test_proc_locks_line_parser_reads_real_lines(parts: dict[str, Any]) -> None:
    parsed = kernel_locks.parse_line(_line(parts))
    assert parsed is not None, _line(parts)
    assert parsed.kind == parts["kind"]
    assert parsed.mode == parts["mode"]
    assert parsed.pid == parts["pid"]
    assert parsed.key == (os.makedev(parts["major"], parts["minor"]), parts["ino"])
    assert parsed.waiting == bool(parts["arrows"])
