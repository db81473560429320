"""An owner record file mapped into memory, where a store into it is safe.

Two ``pwrite`` calls per hold (the record, then its blanking) cost more than
the two ``flock`` calls: each write takes the file system's write path and,
once anything has asked for the file's times, stamps a fine-grained
modification time through the journal. A store into a shared mapping of the
same page costs a memory copy, and readers see it at once (``read`` and the
mapping share the page cache).

The price of a mapping is ``SIGBUS``, which Python cannot catch: a store into
a page with no file behind it (the file was truncated to nothing), or a
store the file system cannot back (a hole to fill, or a copy-on-write file
system, on a full disk). So a record is mapped only where none of that can
happen behind the writer's back:

- the file system writes in place: ext4, XFS or tmpfs;
- the file is a regular file with one link, owned by this process's user,
  writable by nobody else (another user cannot truncate it);
- it has no holes, fits in one page, and is at least as long as the record;
- fewer than :data:`MAX_MAPPINGS` records are mapped in this process (each
  mapping is one of the kernel's ``vm.max_map_count``, 65,530 by default).

The writer still checks the file's size before every store (``fstat``, which
it needs anyway to notice a record file that was replaced), so a holder of
another kind that empties the file on release (grex's Rust core may) is seen
before a store can fault. Anything else falls back to ``pwrite``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import stat
import sys

#: At most this many record files are mapped at once in one process.
MAX_MAPPINGS = 1024

# statfs(2) magic numbers of the file systems that write a mapped page in place.
_IN_PLACE_FILE_SYSTEMS = frozenset({0xEF53, 0x58465342, 0x01021994})  # ext4, XFS, tmpfs

_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_mapped = 0
_file_system_in_place: dict[int, bool] = {}


def _writes_in_place(fd: int, device: int) -> bool:
    """Whether the file system of ``fd`` (on ``device``) is one of the in-place ones."""
    known = _file_system_in_place.get(device)
    if known is None:
        known = _file_system_in_place[device] = _statfs_type(fd) in _IN_PLACE_FILE_SYSTEMS
    return known


def _statfs_type(fd: int) -> int | None:
    # os has no fstatfs; f_type is the first member of struct statfs on Linux.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buffer = ctypes.create_string_buffer(256)
        if libc.fstatfs(fd, buffer) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return ctypes.c_long.from_buffer(buffer).value


def map_record(fd: int, st: os.stat_result) -> mmap.mmap | None:
    """A shared writable mapping of the record file ``fd`` (whose ``fstat`` is ``st``), or None.

    None whenever a store into it could fault (see the module docstring) or
    the mapping fails; the caller then writes with ``pwrite``.
    """
    global _mapped  # noqa: PLW0603 - a process-wide count of mappings
    size = st.st_size
    if (
        _mapped >= MAX_MAPPINGS
        or not 0 < size <= mmap.PAGESIZE
        or not stat.S_ISREG(st.st_mode)
        or st.st_nlink != 1
        or st.st_uid != os.geteuid()
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        or st.st_blocks * 512 < size
        or not _writes_in_place(fd, st.st_dev)
    ):
        return None
    try:
        if sys.version_info >= (3, 13):
            # No duplicate descriptor: the record file's own one is enough.
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, _PROT, trackfd=False)
        else:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, _PROT)
    except (OSError, ValueError):
        return None
    _mapped += 1
    return mapping


def unmap(mapping: mmap.mmap) -> None:
    """Unmap a mapping made by :func:`map_record`."""
    global _mapped  # noqa: PLW0603 - a process-wide count of mappings
    with contextlib.suppress(BufferError, OSError):
        mapping.close()
    _mapped -= 1


def _reset_after_fork() -> None:
    # A forked child counts only its own mappings: the inherited ones belong
    # to record files of the parent's generation, which drop them unused.
    global _mapped  # noqa: PLW0603 - a process-wide count of mappings
    _mapped = 0


os.register_at_fork(after_in_child=_reset_after_fork)
