"""Opening lock files safely, and knowing which file a descriptor names.

A lock file is opened once per lock object, created if missing, never
truncated, never deleted, never followed through a symlink planted at its
own path, and never inherited across ``exec`` by accident. Every descriptor
the library owns (lock files, owner records, kernel-wait helpers') is tracked
here, so that a forked child closes them all without unlocking.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import stat
from pathlib import Path

from grex_locks.errors import LockIOError

#: (st_dev, st_ino): what makes two spellings of a path the same lock.
FileKey = tuple[int, int]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# flock needs no write access, so a read-only open lets anyone who can read a
# shared lock file take the lock; O_NONBLOCK keeps a FIFO planted at the path
# from hanging the open (it is refused just below, as not a regular file).

#: Descriptors the library owns in this process; a forked child closes them all.
_owned: set[int] = set()


def track(fd: int) -> None:
    """Count ``fd`` among the library's descriptors (closed in a forked child)."""
    _owned.add(fd)


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a file of another kind"


def not_a_directory(path: Path, exc: OSError, directory: str = "its directory") -> str | None:
    """Why ``path``'s directory could not be made (``exc``): an ancestor that exists is a file.

    A sentence naming the nearest existing ancestor of ``path`` when that is
    not a directory (``its directory /ws/afile is a regular file, not a
    directory``; ``directory`` names ``path.parent`` for a person), or
    ``None`` when ``exc`` is not what meeting a file gives (``EEXIST``, or
    ``ENOTDIR`` below one), or the ancestor is a directory (or cannot be
    looked at).
    """
    if exc.errno not in (errno.EEXIST, errno.ENOTDIR):
        return None
    return _file_among_ancestors(path, directory)


def _file_among_ancestors(path: Path, directory: str) -> str | None:
    for ancestor in path.parents:
        try:
            os.lstat(ancestor)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there: its own parent is the one to look at
        except OSError:
            return None
        try:
            mode = os.stat(ancestor).st_mode
        except FileNotFoundError:
            what = "a symlink to nothing"
        except OSError:
            return None
        else:
            if stat.S_ISDIR(mode):
                return None
            what = ("a symlink to " if os.path.islink(ancestor) else "") + _kind_of(mode)
        if ancestor == path.parent:
            return f"{directory} {ancestor} is {what}, not a directory"
        return f"{ancestor} is {what}, not a directory, so {directory} {path.parent} cannot be made"
    return None


def _refusal(path: Path, exc: OSError) -> LockIOError:
    blocked = not_a_directory(path, exc)
    if blocked is not None:
        reason = blocked
    elif exc.errno == errno.ELOOP:
        reason = (
            "a symlink sits at the lock file's path and lock files are never followed "
            f"(remove it with `rm {shlex.quote(str(path))}`, or give the real path)"
        )
    elif exc.errno == errno.EISDIR:
        reason = "a directory sits where the lock file should be (move it away)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = (
            f"permission denied (uid {os.geteuid()} may not open it, or create it in "
            f"{path.parent}: the directory's owner can open it to you, e.g. a shared group "
            "and mode 2775)"
        )
    elif exc.errno == errno.EROFS:
        reason = "the file system is read-only (lock files must be on a writable one)"
    elif exc.errno in (errno.EMFILE, errno.ENFILE):
        reason = "out of file descriptors (close some, or raise the limit: ulimit -n)"
    elif exc.errno == errno.ENAMETOOLONG:
        reason = "its name is too long for the file system (use a shorter path)"
    else:
        reason = exc.strerror or str(exc)
    return LockIOError(path, f"cannot open lock file {path}: {reason}")


def _open_or_create(path: Path) -> int:
    # An existing file is opened *without* O_CREAT: with fs.protected_regular
    # (the default on many distributions) an O_CREAT open of another user's
    # file in a sticky world-writable directory fails with EACCES, even for
    # root, and one user would lock the others out of a shared workspace.
    while True:
        try:
            return os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # created by someone else just now: open theirs
        _readable_by_all(fd)
        return fd


def _readable_by_all(fd: int) -> None:
    """Make a lock file we just created readable by everyone, whatever our umask.

    Whoever can open a lock file can take the lock (flock needs only read
    access), and nobody can take it without: a creator with umask 077 would
    otherwise lock every other user of a shared directory out for good. The
    file is empty, so reading it tells nothing; write access stays as the
    umask left it.
    """
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o444 != 0o444:
            os.fchmod(fd, mode | 0o444)
    except OSError:
        pass  # the lock works for its creator all the same


def make_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each with its parent's permission bits.

    Not with the umask: a creator with umask 077 would make directories only
    it can enter, and lock every other user of a shared workspace out of the
    lock files inside for good; with umask 022 in a group-shared (2775)
    workspace, a directory its group could not write records in. A created
    directory is exactly as open as the one it was created in (a private
    parent keeps it private). Never follows a symlink to change a mode.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, 0o700)
        except FileExistsError:
            if created.is_dir():
                continue  # made by someone else just now
            raise  # a dangling symlink, say: the caller's error names it
        try:
            mode = stat.S_IMODE(os.stat(created.parent).st_mode)
            fd = os.open(created, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # it works for its creator all the same
        try:
            os.fchmod(fd, mode)
        except OSError:
            pass
        finally:
            os.close(fd)


def open_lock_file(path: Path, *, make_parents: bool = True) -> int:
    """Open (creating if needed) the lock file at ``path``; return the descriptor.

    Raises :class:`LockIOError` (with the ``OSError`` as its cause) when the
    OS refuses, when a symlink or directory sits at ``path``, or when ``path``
    is anything but a regular file.
    """
    try:
        if make_parents:
            make_directories(path.parent)
        fd = _open_or_create(path)
    except OSError as exc:
        raise _refusal(path, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise _refusal(path, exc) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            cause = OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            raise _refusal(path, cause) from cause
        raise LockIOError(path, f"cannot use {path} as a lock file: it is not a regular file")
    _owned.add(fd)
    return fd


def reopen(fd: int, path: Path) -> int:
    """Open a new, independent open file description of the file behind ``fd``.

    flock belongs to the open file description, so a waiter that may be
    abandoned must wait on a description of its own: otherwise its eventual
    unlock would free a later holder's lock. Opening ``/proc/self/fd/N``
    reaches the very inode ``fd`` names even if the path has been swapped
    since; without ``/proc`` the path is reopened and checked to be the same
    file.
    """
    try:
        try:
            new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            new = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            if file_key(new) != file_key(fd):
                os.close(new)
                raise LockIOError(path, f"lock file {path} was replaced while in use") from None
    except OSError as exc:
        raise _refusal(path, exc) from exc
    _owned.add(new)
    return new


def close(fd: int) -> None:
    """Close a descriptor of the library's (closing never unlocks a shared description)."""
    _owned.discard(fd)
    os.close(fd)


def close_once(handle: list[int]) -> None:
    """Close the descriptor in ``handle`` (a one-item list) the first time only.

    Undo steps may run twice when an interruption cuts a release short; a
    second plain ``close`` could close a descriptor number reused meanwhile.
    """
    if handle:
        close(handle.pop())


def file_key(fd: int) -> FileKey:
    """The identity of the file behind ``fd``: ``(st_dev, st_ino)``."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _close_all_inherited() -> None:
    # In a forked child: close every inherited descriptor without unlocking.
    # An unlock from the child would free the parent's lock (the description is
    # shared); a plain close only drops the child's reference, so the lock is
    # freed when the parent lets go or dies, even while the child lives on.
    for fd in _owned:
        with contextlib.suppress(OSError):
            os.close(fd)
    _owned.clear()


os.register_at_fork(after_in_child=_close_all_inherited)


def owned_descriptors() -> frozenset[int]:
    """The descriptors the library holds open in this process now."""
    return frozenset(_owned)
