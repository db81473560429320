"""The owner record: who holds a lock, written beside it as ``<lock>.owner``.

The record is information, never authority: the kernel decides who holds a
lock, and diagnostics check the record against the kernel. Writing goes
through a private temporary file renamed over the record path, so a reader
sees the old record or the new one, never half of either, and a symlink
planted at the record path is replaced rather than written through. A
holder clears the record *before* it unlocks: clearing after unlocking could
erase the record of the next holder.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
from loguru import logger

from grex_locks.errors import LockIOError

from .tiers import Tier
from .undo import Undo

OWNER_SUFFIX = ".owner"
#: Diagnostics read at most this much of a record; anything larger is garbage.
MAX_RECORD_BYTES = 64 * 1024

_counter = itertools.count()


def record_path(lock_path: Path) -> Path:
    """The owner record's path for ``lock_path``."""
    return lock_path.with_name(lock_path.name + OWNER_SUFFIX)


class _ProcessFacts:
    """Facts about this process that every record repeats, computed once per pid."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # Raises OSError (out of descriptors, say) rather than cache a wrong
        # start time: every later record would carry it.
        self.create_time = psutil.Process(self.pid).create_time()
        self.hostname = socket.gethostname()
        self.argv = list(sys.argv)
        # The fixed part of every record of this process, encoded once: an
        # uncontended acquire should not pay for re-encoding argv.
        fixed = json.dumps(
            {
                "pid": self.pid,
                "create_time": self.create_time,
                "hostname": self.hostname,
                "argv": self.argv,
            },
            separators=(",", ":"),
        )
        self.fixed_json = fixed[1:-1]


_facts: _ProcessFacts | None = None


def process_facts() -> _ProcessFacts:
    """This process's pid, start time and host, refreshed after a fork."""
    global _facts  # noqa: PLW0603 - a per-process cache, checked against the pid
    facts = _facts
    if facts is None or facts.pid != os.getpid():
        facts = _facts = _ProcessFacts()
    return facts


#: Thread names as JSON strings: encoding the same few names on every acquire
#: costs as much as the write that follows.
_json_string = functools.lru_cache(maxsize=1024)(json.dumps)


def _encode(tier: Tier) -> bytes:
    facts = process_facts()
    thread = _json_string(threading.current_thread().name)
    return (
        f'{{{facts.fixed_json},"thread":{thread},"tier":{tier.value},"acquired_at":{time.time()!r}}}'
    ).encode()


def write_record(target: Path, tier: Tier, undo: Undo, lock_path: Path) -> None:
    """Place this thread's owner record at ``target``; register its clearing on ``undo``.

    Readers never see half a record. The fast path writes into the empty
    record file a previous holder left, in one ``write`` (readers see the
    empty file or the whole record) — but only if that file is a plain
    regular file of ours with one link: never through a symlink, never into
    a hard link planted to another file. Anything else (no file, a stale
    record, a symlink, a stranger's file) is replaced by renaming a fresh
    private file over it. Raises :class:`LockIOError` naming ``lock_path``
    when the directory refuses.
    """
    try:
        data = _encode(tier)
    except (OSError, psutil.Error) as exc:
        raise LockIOError(
            lock_path, f"cannot build the owner record for {lock_path}: {exc}"
        ) from exc
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        handle = [fd]
        if _reusable(fd):
            undo.callback(_clear, target, handle)
            try:
                os.write(fd, data)
            except OSError as exc:
                raise _refused(lock_path, target, exc) from exc
            return
        os.close(handle.pop())
    _replace_record(target, data, undo, lock_path)


def _reusable(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and st.st_uid == os.geteuid()
        and st.st_size == 0
    )


def _refused(lock_path: Path, target: Path, exc: OSError) -> LockIOError:
    return LockIOError(lock_path, f"cannot write the owner record {target}: {exc.strerror or exc}")


def _replace_record(target: Path, data: bytes, undo: Undo, lock_path: Path) -> None:
    _note_stale(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{next(_counter)}.tmp")
    handle: list[int] = []
    # Registered before the file exists (a no-op while the handle is empty),
    # so no interruption can leave a renamed record that nothing will clear.
    undo.callback(_clear, target, handle)
    try:
        handle.append(
            os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        )
        os.write(handle[0], data)
        # rename replaces whatever sits at the record path (a symlink
        # included) instead of writing through it.
        os.rename(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # ours (O_EXCL); gone already if the rename happened
        if isinstance(exc, OSError):
            # open, write or rename failed: no record was placed.
            if handle:
                os.close(handle.pop())
            raise _refused(lock_path, target, exc) from exc
        # An interruption (possibly just after the rename): the _clear step
        # registered above empties whatever we wrote and closes it.
        raise


def _note_stale(target: Path) -> None:
    # A non-empty record found while we hold the lock was left by a holder
    # that died; it is about to be replaced, which is worth a line.
    try:
        st = os.lstat(target)
    except OSError:
        return
    if st.st_size:
        logger.info("replacing stale owner record {} ({} bytes)", target, st.st_size)


def _clear(target: Path, handle: list[int]) -> None:
    """Empty the record we wrote, through our own descriptor, and close it (once).

    Emptying our own inode is always safe: if someone has since replaced the
    file at the record path, theirs is left alone. The empty file stays for
    the next holder's fast path.
    """
    if not handle:
        return
    fd = handle[0]
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        logger.warning("cannot clear owner record {}: {}", target, exc)
    if handle:
        handle.pop()
        os.close(fd)
