"""The owner record: who holds a lock, written beside it as ``<lock>.owner``.

The record is information, never authority: the kernel decides who holds a
lock, and diagnostics check the record against the kernel. So a record that
cannot be written never stops a lock from being taken: the lock is taken, the
problem is logged, and diagnostics show the holder as unknown, with why.

Each lock object keeps one descriptor on its record file and, while it holds
the lock exclusively, overwrites the file *in place*: the record, padded with
spaces over whatever longer text was there before. Release overwrites it
with spaces. Nothing is truncated or deleted, so a record left by another
user in a shared directory is reused rather than fought over, and a holder
pays two stores into a mapped page (:mod:`.mapped_record`, where that is
safe) or two ``pwrite`` calls per hold, rather than an open, a write, a
truncate and a close. The last member of a record, ``"check"``, is the CRC-32 of the
text before it: a reader that catches a write half done sees a mismatch (or
text that is not JSON) and reads again.

A record file is only ever written in place if it is a regular file with one
link, opened without following a symlink. Anything else at the record path
(a symlink, a hard link to another file, a FIFO, a huge file) is replaced by
renaming a private file over it, never written through, and only by the
holder: a process still waiting for the lock leaves the record path as it is,
whatever it finds there (the holder's record is in it). A new record file
is writable by whoever may create files in its directory, so that in a
shared workspace one user's record never locks another user out.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import mmap
import os
import socket
import stat
import sys
import time
import zlib
from pathlib import Path
from threading import current_thread

import psutil
from loguru import logger

from . import lock_file
from .fork import generation
from .mapped_record import map_record, unmap

OWNER_SUFFIX = ".owner"
#: A record file larger than this is not overwritten in place (it is replaced):
#: padding it with spaces would cost a write of its whole size on every hold.
MAX_RECORD_BYTES = 64 * 1024

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Read access is only for mapping the file; a record we may write but not read
# is still written in place, with pwrite.
_WRITE_ONLY_FLAGS = (_OPEN_FLAGS & ~os.O_RDWR) | os.O_WRONLY
_counter = itertools.count()
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_SPACE = ord(" ")


def record_path(lock_path: Path) -> Path:
    """The owner record's path for ``lock_path``."""
    return lock_path.with_name(lock_path.name + OWNER_SUFFIX)


#: At most this much of ``sys.argv`` (encoded) goes into a record: a record
#: must stay far below what readers read (64 KiB), whatever the command line.
MAX_ARGV_BYTES = 8 * 1024
#: A thread name longer than this is cut short in the record.
MAX_THREAD_NAME = 256


def _start_ticks(pid: int) -> int | None:
    """The process's start in clock ticks after boot (Linux): exact, where ``create_time`` is not.

    psutil's ``create_time`` adds the boot time, which the kernel reports in
    whole seconds computed afresh on each read: two processes can see the
    same start a second apart, so a pid reused within that second would look
    like the same process. The ticks come straight from ``/proc/PID/stat``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _record_argv(argv: list[str]) -> list[str]:
    """``argv``, cut short (saying so) where its encoding would pass :data:`MAX_ARGV_BYTES`."""
    kept: list[str] = []
    size = 0
    for i, arg in enumerate(argv):
        encoded = len(json.dumps(arg)) + 1
        if size + encoded > MAX_ARGV_BYTES:
            room = (MAX_ARGV_BYTES - size) // 6  # json.dumps spends at most 6 bytes a character
            kept.append(f"{arg[:room]}... ({len(argv) - i} argument(s) cut short)")
            break
        kept.append(arg)
        size += encoded
    return kept


class _ProcessFacts:
    """The part of every record that is the same for the whole process, encoded once."""

    def __init__(self) -> None:
        pid = os.getpid()
        # Raises OSError (out of descriptors, say) rather than cache a wrong
        # start time: every later record would carry it.
        create_time = psutil.Process(pid).create_time()
        facts: dict[str, object] = {"pid": pid, "create_time": create_time}
        ticks = _start_ticks(pid)
        if ticks is not None:
            facts["start_ticks"] = ticks
        facts |= {"hostname": socket.gethostname(), "argv": _record_argv(list(sys.argv))}
        fixed = json.dumps(facts, separators=(",", ":"))
        self.prefix = fixed[:-1]
        self.generation = generation.value


_facts: _ProcessFacts | None = None


def _facts_now() -> _ProcessFacts:
    global _facts  # noqa: PLW0603 - a per-process cache, renewed in a forked child
    facts = _facts
    if facts is None or facts.generation != generation.value:
        facts = _facts = _ProcessFacts()
    return facts


@functools.lru_cache(maxsize=1024)
def _record_head(facts: _ProcessFacts, thread_name: str, tier: int) -> tuple[bytes, int]:
    # Everything but the time, for one thread and tier, with its CRC so far:
    # encoding the same names on every acquire would cost as much as the
    # write that follows.
    name = json.dumps(thread_name[:MAX_THREAD_NAME])
    text = f'{facts.prefix},"thread":{name},"tier":{tier},"acquired_at":'
    head = text.encode()
    return head, zlib.crc32(head)


def record_head(tier: int) -> tuple[bytes, int]:
    """This thread's record for a lock of ``tier`` up to its time, and that part's CRC-32."""
    facts = _facts
    if facts is None or facts.generation != generation.value:
        facts = _facts_now()
    return _record_head(facts, current_thread().name, tier)


def finish_record(head: tuple[bytes, int]) -> bytes:
    """The record begun by ``head``, stamped with the time now and closed with its check."""
    # Whole microseconds, formatted as integers: shorter code than a float's
    # formatting, on the path that runs right after a hand-off.
    us = time.time_ns() // 1000
    tail = b"%d.%06d" % (us // 1_000_000, us % 1_000_000)
    text, crc = head
    return b'%s%s,"check":"%08x"}' % (text, tail, zlib.crc32(tail, crc))


def encode_record(tier: int) -> bytes:
    """This thread's owner record, now, for a lock of ``tier``."""
    return finish_record(record_head(tier))


class RecordFile:
    """One lock object's owner record file: written while held, blanked on release.

    Not thread-safe by itself: the lock it belongs to is what serialises its
    writers (only the exclusive holder writes).
    """

    __slots__ = (
        "_fd",
        "_generation",
        "_head",
        "_inode",
        "_lock_path",
        "_map",
        "_map_tried",
        "_path_name",
        "_prepared_for",
        "_problem",
        "_seen_ctime",
        "_written",
        "path",
    )

    def __init__(self, lock_path: Path) -> None:
        self.path = record_path(lock_path)
        self._lock_path = lock_path
        self._fd: int | None = None
        #: ``(st_dev, st_ino)`` of the file behind ``_fd``.
        self._inode = (0, 0)
        #: The file's ctime when it was last seen at the record path (see _descriptor_in_place).
        self._seen_ctime = 0
        self._path_name = os.fspath(self.path)
        #: The file's first page, mapped (see :mod:`.mapped_record`), or None: pwrite.
        self._map: mmap.mmap | None = None
        #: The file size a mapping was last tried for (0: not yet, on this descriptor).
        self._map_tried = 0
        #: The waiter whose record file was checked just before it blocked.
        self._prepared_for: object = None
        self._head: tuple[bytes, int] = (b"", 0)
        self._generation = generation.value
        #: How many bytes the current record covers: what :meth:`blank` overwrites.
        self._written = 0
        #: Why the last write placed no record ("" when it did); logged once per cause.
        self._problem = ""

    def prepare(self, tier: int, waiter: object) -> None:
        """Check the record file before ``waiter`` blocks, so that its later write is short.

        The write right after a hand-off runs on a cold cache, in the time the
        next holder is waiting for: the descriptor is opened and the record's
        head encoded here instead, and :meth:`write` for the same ``waiter``
        then only stamps the time. A waiter does not hold the lock, so it
        never replaces what sits at the record path (that would wipe the
        holder's record): a file it cannot overwrite in place is left to
        :meth:`write`, under the lock.
        """
        self._prepared_for = None
        try:
            if self._descriptor_in_place() is None:
                return
            self._head = record_head(tier)
        except (OSError, psutil.Error):
            return  # write() tries again, and logs
        self._prepared_for = waiter

    def write(self, tier: int, waiter: object = None) -> None:
        """Write this thread's record (the caller has registered :meth:`blank` first).

        ``waiter`` is what :meth:`prepare` was called for, if it was. When no
        record can be placed the lock is held all the same: the problem is
        logged, never raised.
        """
        try:
            if waiter is not None and self._prepared_for is waiter:
                self._prepared_for = None
                data = finish_record(self._head)
            else:
                data = encode_record(tier)
            # Checked again even after prepare(): while we waited, the file
            # may have been replaced, removed or emptied.
            fd, size = self._descriptor()
            if size > len(data):
                data += b" " * (size - len(data))
            # Set before the write: an interruption right after it must still
            # find the length to blank.
            self._written = len(data)
            mapping = self._map
            if mapping is not None and len(mapping) == len(data) == size:
                if mapping[0] != _SPACE:  # cleared records start with a space
                    _log_stale(self.path, mapping[:size])
                mapping[:] = data
            else:
                if size:
                    _log_if_stale(self.path, fd, size)
                os.pwrite(fd, data, 0)
                if len(data) != self._map_tried:  # the file's size now
                    self._remap(fd, len(data))
        except (OSError, psutil.Error) as exc:
            self._note_problem(exc)
            return
        self._problem = ""

    def _descriptor(self) -> tuple[int, int]:
        """A descriptor on the file at the record path, fit to overwrite, and its size.

        Only the exclusive holder calls this: what cannot be overwritten in
        place is replaced, and a replacement wipes any record there.
        """
        found = self._descriptor_in_place()
        if found is not None:
            return found
        return self._adopt(self._replace())

    def _descriptor_in_place(self) -> tuple[int, int] | None:
        """A descriptor on the file at the record path and its size; None if unfit to overwrite."""
        fd = self._fd
        if fd is not None and self._generation == generation.value:
            # The file at the record path must still be ours, and ours only:
            # a rename over it (another holder replacing it) or an unlink
            # leaves our descriptor on a file that readers never see, and
            # may leave it on a stray hard link elsewhere with one link.
            # Every such change (and a chmod) sets our file's ctime, while
            # stores into its mapped page (almost never) do: so an fstat
            # showing the ctime last seen at the record path, and one link,
            # is enough; anything else asks the path itself (lstat).
            if self._map is not None:
                st = os.fstat(fd)
                if (
                    st.st_ctime_ns == self._seen_ctime
                    and st.st_nlink == 1
                    and st.st_size <= MAX_RECORD_BYTES
                ):
                    return fd, st.st_size
            try:
                st = os.lstat(self._path_name)
            except FileNotFoundError:
                pass
            else:
                if (
                    st.st_ino == self._inode[1]
                    and st.st_dev == self._inode[0]
                    and st.st_nlink == 1
                    and st.st_size <= MAX_RECORD_BYTES
                ):
                    self._seen_ctime = st.st_ctime_ns
                    if st.st_mode & _WRITABLE_BY_OTHERS and self._map is not None:
                        # Made writable by others since it was mapped (its
                        # creator widens a new file's mode to the
                        # directory's): they could empty it under a store.
                        self._drop_map()
                    return fd, st.st_size
        self.close()
        self._generation = generation.value
        fd = self._open_in_place()
        return None if fd is None else self._adopt(fd)

    def _adopt(self, fd: int) -> tuple[int, int]:
        """Use ``fd`` (on the file now at the record path) from now on; return it and its size."""
        st = os.fstat(fd)
        self._fd = fd
        self._inode = (st.st_dev, st.st_ino)
        self._seen_ctime = st.st_ctime_ns
        return fd, st.st_size

    def blank(self) -> None:
        """Overwrite the record written by :meth:`write` with spaces (no record), in place.

        Idempotent; a failure is logged, never raised: the lock must still be
        released, and a record left behind only reads as a stale one.
        """
        fd, length = self._fd, self._written
        if not length or fd is None or self._generation != generation.value:
            return
        try:
            mapping = self._map
            # A file emptied since the write (by hand, say) has no page left to
            # store into: storing would be SIGBUS. (lseek tells the size
            # without building a whole stat result.)
            if mapping is not None and length <= len(mapping) and os.lseek(fd, 0, os.SEEK_END):
                mapping[:length] = _spaces(length)
            else:
                os.pwrite(fd, _spaces(length), 0)
        except OSError as exc:
            logger.warning("cannot clear owner record {}: {}", self.path, exc)
        self._written = 0

    def close(self) -> None:
        """Close the record's descriptor (a lock object being collected)."""
        fd, self._fd = self._fd, None
        if self._generation != generation.value:
            # Inherited across a fork: closed in this child already, and the
            # mapping is the parent's to unmap.
            self._map = None
            self._map_tried = 0
            return
        self._drop_map()
        if fd is not None:
            lock_file.close(fd)

    def _drop_map(self) -> None:
        """Unmap the record; the next write through pwrite tries to map it again (where safe)."""
        mapping, self._map = self._map, None
        self._map_tried = 0
        if mapping is not None:
            unmap(mapping)

    def _remap(self, fd: int, size: int) -> None:
        """Map the file anew after a write through ``fd`` left it ``size`` bytes long."""
        self._drop_map()
        self._map_tried = size
        self._map = map_record(fd, os.fstat(fd))

    def _open_in_place(self) -> int | None:
        """The record file (created if missing), if we may overwrite it in place; else None."""
        for _ in range(2):
            try:
                fd = _open_for_writing(self.path)
            except FileNotFoundError:
                created = self._create()
                if created is None:
                    continue  # someone else created it just now: open theirs
                return created
            except OSError:
                return None  # a symlink, a stranger's read-only file, a FIFO without reader...
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= MAX_RECORD_BYTES:
                lock_file.track(fd)
                return fd
            os.close(fd)
            return None
        return None  # created and removed again under us, twice: replace it

    def _create(self) -> int | None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        lock_file.track(fd)
        self._share_with_directory(fd)
        return fd

    def _replace(self) -> int:
        """Rename a fresh private file over whatever sits at the record path; return it."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{next(_counter)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        lock_file.track(fd)
        try:
            self._share_with_directory(fd)
            # rename replaces a symlink itself, never what it points to.
            os.rename(tmp, self.path)
        except BaseException:
            lock_file.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # ours (O_EXCL); gone already if the rename happened
            raise
        return fd

    def _share_with_directory(self, fd: int) -> None:
        # Whoever may create files in this directory may take the lock, so
        # they must be able to overwrite the record too: group and other
        # write follow the directory's.
        shared = os.stat(self.path.parent).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared:
            os.fchmod(fd, 0o644 | shared)

    def _note_problem(self, exc: BaseException) -> None:
        reason = _describe(exc)
        if reason != self._problem:
            self._problem = reason
            logger.warning(
                "holding {} without an owner record: {} ({}); diagnostics will show "
                "the holder as unknown",
                self._lock_path,
                reason,
                self.path,
            )


def _log_if_stale(path: Path, fd: int, size: int) -> None:
    """Log the record in ``fd`` (``size`` bytes) about to be overwritten, unless cleared."""
    try:
        old = os.pread(fd, size, 0)
    except OSError:
        return  # opened write-only (another user's file we may write, not read)
    if old[:1] != b" ":
        _log_stale(path, old)


def _log_stale(path: Path, old: bytes) -> None:
    """Log that a record nobody cleared (its holder died holding the lock) is overwritten.

    We hold the lock, so whatever record sits in the file was left by a holder
    that never released it. Only when it says something: an empty file or a
    cleared one is no record.
    """
    if not old.strip():
        return
    try:
        pid = json.loads(old)["pid"]
    except (ValueError, TypeError, KeyError):
        pid = "unknown (not a readable record)"
    logger.info("overwriting a stale owner record {} (left by pid {})", path, pid)


def _open_for_writing(path: Path) -> int:
    try:
        return os.open(path, _OPEN_FLAGS)
    except PermissionError:
        return os.open(path, _WRITE_ONLY_FLAGS)


@functools.lru_cache(maxsize=64)
def _spaces(length: int) -> bytes:
    return b" " * length


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.EISDIR:
            return "a directory sits at the record path"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "another user's record file there cannot be overwritten or replaced"
        return exc.strerror or str(exc)
    return str(exc)
