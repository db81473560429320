"""The owner record format as diagnostics read it: padding, the check, torn reads.

The record file holds one JSON object, then optional ASCII whitespace; a
record written by grex_locks ends with ``"check":"xxxxxxxx"``, the CRC-32
of the text before ``,"check":``. These tests build records by that
definition (independently of the core's writer), and read the records the
real writer produces while it overwrites them in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import read_line

from grex_locks import PackLock
from grex_locks._diagnostics.diagnose import diagnose
from grex_locks._diagnostics.diagnosis import HolderState
from grex_locks._diagnostics.record_reader import (
    MAX_RECORD_BYTES,
    RecordStatus,
    encode_check,
    parse_record,
    read_record,
)


def closed(owner: dict[str, Any]) -> bytes:
    """``owner`` as grex_locks writes it: compact JSON closed by its check member."""
    before = json.dumps(owner, separators=(",", ":"))[:-1].encode()
    check = format(zlib.crc32(before), "08x").encode()
    return before + b',"check":"' + check + b'"}'


OWNER = {"pid": 4242, "create_time": 1700000000.25, "hostname": "h", "argv": ["sync"]}


def _upper_case_check() -> bytes:
    """A record whose check is right but spelled in upper case (the format says lower)."""
    for pid in range(100):
        record = closed({**OWNER, "pid": pid})
        upper = record[:-10] + record[-10:-2].upper() + record[-2:]
        if upper != record:
            return upper
    raise AssertionError("no check with a letter in it")


UPPER = _upper_case_check()


def test_encode_check_is_the_crc32_of_the_text_before_the_check_member() -> None:
    before = b'{"pid":1,"create_time":2.0'
    assert encode_check(before) == format(zlib.crc32(before), "08x").encode()
    assert len(encode_check(b"")) == 8


@pytest.mark.parametrize("padding", [b"", b" ", b" " * 5000, b"\n", b" \t\r\n "])
def test_a_checked_record_with_padding_is_valid(padding: bytes) -> None:
    read = parse_record(closed(OWNER) + padding)
    assert read.status is RecordStatus.VALID
    assert read.owner is not None
    assert read.owner["pid"] == 4242
    before = closed(OWNER)[: -len(b',"check":"01234567"}')]
    assert read.owner["check"] == encode_check(before).decode()


@pytest.mark.parametrize("blank", [b"", b" " * 300, b"\n\n", b" \t "])
def test_whitespace_only_is_no_record(blank: bytes) -> None:
    assert parse_record(blank).status is RecordStatus.EMPTY


def test_records_without_a_check_are_taken_as_they_are() -> None:
    read = parse_record(json.dumps(OWNER).encode() + b"   ")
    assert read.status is RecordStatus.VALID


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("wrong digits", closed(OWNER)[:-10] + b'00000000"}'),
        ("upper-case hex", UPPER),
        ("check not last", b'{"check":"00000000","pid":1,"create_time":1.0}'),
        ("check not a string", b'{"pid":1,"create_time":1.0,"check":12345678}'),
        ("spaced member", closed(OWNER).replace(b',"check":', b', "check": ')),
        (
            "new head, old tail",
            closed({**OWNER, "pid": 7})[:30] + closed({**OWNER, "argv": ["x" * 9]})[30:],
        ),
    ],
)
def test_a_check_that_does_not_match_is_unreadable_and_torn(name: str, data: bytes) -> None:
    read = parse_record(data)
    assert read.status is RecordStatus.UNREADABLE, name
    assert read.torn


@pytest.mark.parametrize(
    "text",
    [
        b'{"pid":1,"create_time":NaN}',
        b'{"pid":1,"create_time":Infinity}',
        b'{"pid":1,"create_time":-Infinity}',
        b'{"pid":1,"create_time":1e400}',
        b'{"pid":1,"create_time":1' + b"0" * 400 + b"}",
    ],
)
def test_a_non_finite_start_time_is_unreadable(text: bytes) -> None:
    read = parse_record(text)
    assert read.status is RecordStatus.UNREADABLE
    assert "create_time" in read.problem


def test_half_a_record_is_unreadable_after_rereading(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.touch()
    record = closed(OWNER)
    Path(f"{lock}.owner").write_bytes(record[: len(record) // 2] + b" " * 40)
    read = read_record(lock)
    assert read.status is RecordStatus.UNREADABLE
    assert read.torn
    d = diagnose(lock)
    assert d.state is HolderState.STALE_RECORD
    assert "not JSON" in d.explain()


def test_a_record_padded_to_the_limit_is_read(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.touch()
    record = closed(OWNER)
    Path(f"{lock}.owner").write_bytes(record + b" " * (MAX_RECORD_BYTES - len(record)))
    assert read_record(lock).status is RecordStatus.VALID


#: Take and release argv[1]'s pack lock (grex_locks' own writer) until stdin closes.
CHURN = r"""
import os, sys, threading
from grex_locks import PackLock
lock = PackLock(sys.argv[1])
with lock:
    pass
print("ready", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    with lock:
        pass
"""


def test_records_rewritten_in_place_are_never_read_torn(tmp_path: Path) -> None:
    """While the real writer overwrites its record in place, a reader sees a record or none."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHURN, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    try:
        assert read_line(proc) == "ready"
        lock = tmp_path / ".grex-lock"
        seen: Counter[RecordStatus] = Counter()
        for _ in range(3000):
            read = read_record(lock)
            seen[read.status] += 1
            if read.status is RecordStatus.VALID:
                assert read.owner is not None
                assert read.owner["pid"] == proc.pid
            assert read.status is not RecordStatus.UNREADABLE, read.problem
        assert seen[RecordStatus.VALID], seen
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0
    # Released: the file is overwritten with spaces (or emptied), never removed.
    assert read_record(tmp_path / ".grex-lock").status in (RecordStatus.EMPTY, RecordStatus.MISSING)


def test_the_real_writer_closes_its_record_with_a_matching_check(tmp_path: Path) -> None:
    lock = PackLock(tmp_path)
    with lock:
        data = Path(f"{lock.path}.owner").read_bytes()
    body = data.strip()
    read = parse_record(data)
    assert read.status is RecordStatus.VALID
    assert read.owner is not None
    if "check" not in read.owner:
        pytest.skip("the core's writer does not write a check member yet")
    cut = body.rindex(b',"check":')
    assert body[cut:] == b',"check":"' + encode_check(body[:cut]) + b'"}'
    assert os.getpid() == read.owner["pid"]
