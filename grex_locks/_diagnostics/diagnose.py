"""Diagnosing a lock by its path: ``diagnose``, and what a directory or odd file there means.

:func:`diagnose` is the public entry; :func:`inspect` is what it, ``scan``
and ``grex-locks who`` share: whatever sits at a lock path (nothing, a file,
a directory, a FIFO, a symlink, something we may not look at) becomes one
:class:`Diagnosis`. The judging itself is :mod:`.judge`'s.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from loguru import logger

from grex_locks._core.lock_file import FileKey

from .diagnosis import Diagnosis
from .judge import judge
from .kernel_lock_table import KernelLock, KernelLockTable
from .lock_names import PACK_LOCK, is_lock_name
from .probe import Probe
from .record_reader import RecordRead, file_type_of, os_problem, read_record
from .verdicts import MODE_UNKNOWN

#: How many entries of a directory are looked at to name its other locks.
_LISTING_LIMIT = 4096


def inspect(
    path: Path,
    probe: Probe,
    st: os.stat_result | None = None,
    *,
    record: RecordRead | None = None,
    note: str = "",
    before: RecordRead | None = None,
) -> Diagnosis:
    """Diagnose whatever sits at the lock path ``path`` (``st`` is its ``lstat``, if known).

    ``record`` is its owner record when already known (a scan knows from the
    directory listing that there is none); by default it is read now.
    ``before`` is the record as read before ``probe``'s table, if it was
    (it can confirm a stale record at once).

    A missing file is ``FREE``; one the system will not let us look at is
    ``UNREADABLE``; anything but a regular file is diagnosed by its own
    identity (a symlink is never followed, as no lock follows one) with
    ``lock_file_type`` saying what it is.
    """
    if st is None:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            # No lock file: only what blocks the record path (a planted
            # directory, say) is worth a look at the record.
            return judge(path, None, record or read_record(path), probe, note=note)
        except OSError as exc:
            return probe.unreadable(path, f"cannot look at {path}: {os_problem(exc)}")
    file_type = file_type_of(st.st_mode)
    if file_type == "symlink":
        try:
            target = f"to {os.readlink(path)}"
        except OSError:
            target = "whose target cannot be read"
        note = "; ".join(filter(None, (note, f"a symlink ({target}) sits at the lock path")))
    elif file_type:
        note = "; ".join(filter(None, (note, f"a {file_type} sits at the lock path")))
    return judge(
        path,
        (st.st_dev, st.st_ino),
        record if record is not None else read_record(path),
        probe,
        links=st.st_nlink,
        lock_file_type=file_type,
        note=note,
        before=before,
    )


def lock_path_of(path: Path) -> Path:
    """The lock file ``path`` means: a directory means its pack lock (``<dir>/.grex-lock``).

    The exception is a directory whose own name is a lock file's (a directory
    planted at a lock path): that is diagnosed as the (unusable) lock itself.
    """
    if not is_lock_name(path.name) and os.path.isdir(path):
        return path / PACK_LOCK
    return path


def _other_locks_note(directory: Path) -> str:
    try:
        with os.scandir(directory) as listing:
            names = sorted(
                e.name
                for _, e in zip(range(_LISTING_LIMIT), listing, strict=False)
                if is_lock_name(e.name)
            )
    except OSError:
        return ""
    if not names:
        return ""
    return (
        f"{directory} holds other grex locks ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}): `grex-locks who {shlex.quote(str(directory))}` "
        "diagnoses them all"
    )


def diagnose(
    lock_file: str | os.PathLike[str], *, table: KernelLockTable | None = None
) -> Diagnosis:
    """Diagnose one lock file without taking it or changing any file; never raises on its record.

    Given a directory, diagnoses that directory's pack lock, ``<dir>/.grex-lock``
    (the pack rule, as ``PackLock(dir)`` and ``grex-locks run DIR`` mean it),
    never the directory itself — whatever the directory is: when it has no
    ``.grex-lock`` the result is ``FREE`` ("the lock file does not exist"),
    and its note names the other grex locks in that directory, if any (a
    workspace's sync and manifest locks; ``grex-locks who DIR`` lists them
    all). A directory whose own name is a lock file's is diagnosed as that
    lock path, with ``lock_file_type == "directory"``.

    A missing lock file is ``FREE``; one that cannot be looked at (permission
    denied on its directory) is ``UNREADABLE``, naming the error and path.
    ``table`` is a :class:`KernelLockTable` snapshot to judge against; by
    default the kernel's table is read now.
    """
    given = Path(lock_file).absolute()
    path = lock_path_of(given)
    note = ""
    if path != given and not os.path.lexists(path):
        note = "; ".join(filter(None, ("the lock file does not exist", _other_locks_note(given))))
    try:
        inode = os.lstat(path).st_ino
    except OSError:
        inode = None
    live = table is None
    # The record is read before the table as well as after it: a record
    # alike on both sides of a table showing the lock free is a stale one.
    before = read_record(path) if live else None
    if table is None:
        table = KernelLockTable.read(inode=inode)
    result = inspect(path, Probe(table, live=live), note=note, before=before)
    logger.debug("{}: {}", path, result.state.name)
    return result


def diagnose_busy(lock_file: Path, key: FileKey) -> Diagnosis:
    """Diagnose a lock that an acquire has just found held, for the error it raises.

    Judged from the owner record and the processes it names, against a lock
    table that says only "held": reading the kernel's real table can take
    milliseconds (it waits for the kernel to quiesce its lock lists), and a
    timeout must return on time. Whether it is held shared comes from the
    holders' own ``fdinfo``. ``grex-locks who`` gives the full picture.
    """
    busy = KernelLockTable([KernelLock(kind="FLOCK", mode=MODE_UNKNOWN, pid=0, key=key)])
    try:
        links = os.lstat(lock_file).st_nlink
    except OSError:
        links = 1
    return judge(lock_file, key, read_record(lock_file), Probe(busy), links=links)
