"""The kernel's view of file locks: who took each lock, who waits, who holds it now.

Two sources, both Linux ``/proc``, both read-only:

* ``/proc/locks`` lists every granted lock and every blocked waiter with the
  pid that *took* it and the file as ``major:minor:inode`` (device numbers
  in hex, inode in decimal). :class:`KernelLockTable` reads it once and
  answers per file identity ``(st_dev, st_ino)``.
* ``/proc/<pid>/fd`` and ``/proc/<pid>/fdinfo`` tell which processes have a
  file open and, since Linux 4.14, which descriptor holds a lock on it
  (a ``lock:`` line). A flock belongs to an open file description, so when
  the pid that took it has died, the real holders are whoever inherited that
  description. :class:`ProcessFiles` finds them, lazily: the full walk over
  every process is the expensive step, done at most once per inspection.

Nothing here raises on what it reads: the kernel's text is parsed
defensively, and a process that vanishes or refuses inspection is skipped.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from grex_locks._core.lock_file import FileKey

from .process_tree import children_of, proc_stat

PROC_LOCKS = "/proc/locks"

_LINE = re.compile(
    r"""
    \s*(?P<id>\d{1,19}):\s+
    (?P<arrows>(?:->\s*)*)              # a blocked waiter is marked "->"
    (?P<kind>[A-Z]+)\s+\S+\s+           # FLOCK/POSIX/OFDLCK/LEASE..., ADVISORY/ACTIVE...
    (?P<mode>[A-Z]+)\s+
    (?P<pid>-?\d{1,19})\s+
    (?P<major>[0-9a-fA-F]{1,8}):(?P<minor>[0-9a-fA-F]{1,8}):(?P<ino>\d{1,20})
    (?:\s+\S+(?:\s+\S+)?)?\s*           # byte range, "0 EOF" for whole-file locks
    """,
    re.ASCII | re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class KernelLock:
    """One line of the kernel's lock table.

    ``pid`` is the process that took the lock (or asked for it, for a
    waiter); ``0`` means it is not visible from this pid namespace and ``-1``
    that the lock belongs to an open file description (OFD locks).
    """

    kind: str
    mode: str
    pid: int
    key: FileKey
    waiting: bool = False


def parse_line(line: str) -> KernelLock | None:
    """Parse one ``/proc/locks`` line; ``None`` for anything unrecognised, never raises."""
    try:
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        dev = os.makedev(int(match["major"], 16), int(match["minor"], 16))
        return KernelLock(
            kind=match["kind"],
            mode=match["mode"],
            pid=int(match["pid"]),
            key=(dev, int(match["ino"])),
            waiting=bool(match["arrows"]),
        )
    except (ValueError, OverflowError, TypeError):
        return None


class KernelLockTable:
    """A snapshot of the kernel's lock table, queried by file identity.

    Built once (per diagnosis, or per scan over many locks) so that asking
    about ten thousand files costs one read of ``/proc/locks``. Where the
    table does not exist, :attr:`available` is ``False`` and :attr:`reason`
    says why; every query then answers "nothing known".
    """

    def __init__(
        self, locks: Iterable[KernelLock] = (), *, available: bool = True, reason: str = ""
    ) -> None:
        self.available = available
        self.reason = reason
        # Two identical lines carry no more information than one (pids are what
        # diagnostics need), and dropping them makes unions of reads exact.
        self.locks: tuple[KernelLock, ...] = tuple(dict.fromkeys(locks))
        self._granted: dict[FileKey, list[KernelLock]] = defaultdict(list)
        self._waiting: dict[FileKey, list[KernelLock]] = defaultdict(list)
        for lock in self.locks:
            (self._waiting if lock.waiting else self._granted)[lock.key].append(lock)

    @classmethod
    def parse(cls, text: str, *, inode: int | None = None) -> KernelLockTable:
        """The table described by ``text`` in ``/proc/locks`` format; bad lines are skipped.

        With ``inode``, only lines that can concern that inode are parsed: a
        machine with thousands of locks makes one diagnosis pay for a regex
        per line otherwise.
        """
        lines = text.splitlines()
        if inode is not None:
            needle = f":{inode} "
            lines = [line for line in lines if needle in line or line.endswith(f":{inode}")]
        parsed = (parse_line(line) for line in lines)
        return cls(lock for lock in parsed if lock is not None)

    @classmethod
    def unavailable(cls, reason: str) -> KernelLockTable:
        """An empty table that says the kernel's view could not be had, and why."""
        return cls(available=False, reason=reason)

    @classmethod
    def read(
        cls, path: str = PROC_LOCKS, *, attempts: int = 4, inode: int | None = None
    ) -> KernelLockTable:
        """Read the kernel's lock table now; never raises, never takes a lock.

        The kernel renders the table one page per ``read()`` call and resumes
        by position, so a table longer than a page that changes between calls
        can show a lock twice or skip one that was held all along. A table
        read in one call, or read twice alike, is taken as it is; otherwise
        the union of ``attempts`` reads is kept, erring towards "held" rather
        than miss a holder. ``inode`` keeps only the lines about that inode.
        """
        seen: list[KernelLock] = []
        previous: bytes | None = None
        for _ in range(max(1, attempts)):
            try:
                data, calls = _read_all(path)
            except FileNotFoundError:
                return cls.unavailable(
                    f"this system has no {path}, so the kernel's locks are unseen"
                )
            except OSError as exc:
                return cls.unavailable(f"cannot read {path}: {exc.strerror or exc}")
            if calls <= 1 or data == previous:
                return cls.parse(data.decode("ascii", "replace"), inode=inode)
            previous = data
            seen.extend(cls.parse(data.decode("ascii", "replace"), inode=inode).locks)
        return cls(seen)

    def holders(self, key: FileKey, kind: str | None = "FLOCK") -> list[KernelLock]:
        """Granted locks on the file ``key`` (of ``kind``; ``None`` for every kind)."""
        return [lock for lock in self._granted.get(key, ()) if kind is None or lock.kind == kind]

    def waiters(self, key: FileKey, kind: str | None = "FLOCK") -> list[KernelLock]:
        """Blocked requests for the file ``key`` (of ``kind``; ``None`` for every kind)."""
        return [lock for lock in self._waiting.get(key, ()) if kind is None or lock.kind == kind]

    def __contains__(self, key: object) -> bool:
        """Whether the kernel lists any lock or waiter, of any kind, on the file ``key``."""
        return key in self._granted or key in self._waiting

    def __len__(self) -> int:
        return len(self.locks)


def _read_all(path: str) -> tuple[bytes, int]:
    """The whole of ``path`` and how many ``read()`` calls returned data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), len(chunks)


@functools.cache
def _fdinfo_lists_locks() -> bool:
    # Linux 4.14 added "lock:" lines to /proc/<pid>/fdinfo; before that, an
    # absent line proves nothing.
    try:
        release = os.uname().release
        major, minor = (int(part) for part in re.findall(r"\d+", release)[:2])
    except (ValueError, AttributeError):
        return False
    return (major, minor) >= (4, 14)


@dataclass(frozen=True, slots=True)
class Opener:
    """A process that has a file open: ``locked`` says whether that descriptor holds a flock.

    ``locked`` is ``None`` when the kernel does not say (before Linux 4.14,
    or when ``fdinfo`` is not readable).
    """

    pid: int
    fd: int
    locked: bool | None


class ProcessFiles:
    """Which processes have which files open, learned from ``/proc`` lazily and once.

    One process's descriptors are listed the first time a question needs
    them; :meth:`openers` lists every process's, once, and only when asked.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._by_pid: dict[int, dict[FileKey, list[int]] | None] = {}
        self._walked_all = False
        self._fdinfo_locks = _fdinfo_lists_locks()
        self._fdinfo: dict[tuple[int, int], tuple[bool | None, str, int | None]] = {}

    def files_of(self, pid: int) -> dict[FileKey, list[int]] | None:
        """The regular files ``pid`` has open, by identity; ``None`` if that cannot be seen."""
        if pid in self._by_pid:
            return self._by_pid[pid]
        files: dict[FileKey, list[int]] | None = None
        if pid > 0:
            try:
                with os.scandir(f"{self._proc}/{pid}/fd") as entries:
                    files = {}
                    for entry in entries:
                        try:
                            # stat follows the magic link to the open file itself,
                            # whatever path (or none) it is now reachable by.
                            st = os.stat(entry.path)
                            fd = int(entry.name)
                        except (OSError, ValueError):
                            continue
                        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                            files.setdefault((st.st_dev, st.st_ino), []).append(fd)
            except OSError:
                files = None
        self._by_pid[pid] = files
        return files

    def names(self, pid: int, key: FileKey) -> list[Path]:
        """The paths by which ``pid`` opened the file ``key`` (that still exist), as /proc says."""
        found = []
        for fd in (self.files_of(pid) or {}).get(key, ()):
            try:
                target = os.readlink(f"{self._proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            # An unlinked file reads "... (deleted)"; a name in another mount
            # namespace may not be this one's: the caller checks the identity.
            if target.startswith("/") and not target.endswith(" (deleted)"):
                found.append(Path(target))
        return list(dict.fromkeys(found))

    def fd_locked(self, pid: int, fd: int) -> bool | None:
        """Whether descriptor ``fd`` of ``pid`` holds a granted flock; ``None`` if unknowable."""
        return self._fd_flock(pid, fd)[0]

    def _fd_flock(self, pid: int, fd: int) -> tuple[bool | None, str, int | None]:
        """``(locked, mode, taker)`` of descriptor ``fd`` of ``pid``, from its ``fdinfo`` (cached).

        ``taker`` is the pid its ``lock:`` line names: as in ``/proc/locks``,
        the process that took the lock (``0``: not visible from this pid
        namespace), which need not be ``pid`` (a descriptor inherited, or
        handed on); ``None`` when no lock line was seen.
        """
        known = self._fdinfo.get((pid, fd))
        if known is not None:
            return known
        try:
            text = Path(f"{self._proc}/{pid}/fdinfo/{fd}").read_text("ascii", "replace")
        except OSError:
            return (None, "", None)
        found: tuple[bool | None, str, int | None] = (
            False if self._fdinfo_locks else None,
            "",
            None,
        )
        for line in text.splitlines():
            if line.startswith("lock:"):
                lock = parse_line(line[len("lock:") :])
                if lock is not None and lock.kind == "FLOCK" and not lock.waiting:
                    found = (True, lock.mode, lock.pid)
                    break
        self._fdinfo[(pid, fd)] = found
        return found

    def lock_mode(self, pid: int, key: FileKey) -> str | None:
        """``"READ"`` or ``"WRITE"``: how ``pid`` holds its flock on ``key``; ``None`` if unseen."""
        modes = {self._fd_flock(pid, fd)[1] for fd in (self.files_of(pid) or {}).get(key, ())}
        modes.discard("")
        if not modes:
            return None
        return "WRITE" if "WRITE" in modes else modes.pop()

    def holds(self, pid: int, key: FileKey) -> bool | None:
        """Whether ``pid`` holds a flock on ``key``; ``None`` when the kernel cannot tell us."""
        files = self.files_of(pid)
        if files is None:
            return None
        fds = files.get(key)
        if not fds:
            return False
        verdicts = [self.fd_locked(pid, fd) for fd in fds]
        if True in verdicts:
            return True
        return None if None in verdicts else False

    def takers(self, key: FileKey) -> list[int]:
        """Who took the flock on ``key``, as its holders' ``fdinfo`` says (walks every process).

        The same pids the kernel's table would list, learned without reading
        that table (which can take milliseconds); ``[]`` when no holder's
        ``fdinfo`` could be seen.
        """
        takers = (self._fd_flock(o.pid, o.fd)[2] for o in self.openers(key) if o.locked)
        return list(dict.fromkeys(pid for pid in takers if pid is not None))

    def openers(self, key: FileKey) -> list[Opener]:
        """Every visible process with ``key`` open — the expensive walk over all of ``/proc``."""
        if not self._walked_all:
            self._walked_all = True
            try:
                with os.scandir(self._proc) as entries:
                    pids = [int(e.name) for e in entries if e.name.isdigit()]
            except OSError:
                pids = []
            for pid in pids:
                self.files_of(pid)
        found: list[Opener] = []
        for pid, files in sorted(self._by_pid.items()):
            for fd in (files or {}).get(key, ()):
                found.append(Opener(pid, fd, self.fd_locked(pid, fd)))
        return found

    def holders(self, key: FileKey, taker_pids: list[int], waiter_pids: list[int]) -> list[int]:
        """The pids that hold the flock on ``key`` now, cheapest evidence first.

        While every pid the kernel says took the lock still holds it (or is
        alive and cannot be seen not to), the others are looked for in the
        takers' families (:meth:`with_family`). Only if a taker is gone or let
        go of it (it died, or handed the descriptor on) are all processes'
        open files walked. Without ``fdinfo`` evidence, every opener that is
        not a known waiter is a possible holder; failing that, the takers
        themselves (the caller drops the dead).
        """
        takers = [pid for pid in dict.fromkeys(taker_pids) if pid > 0]
        if takers and all(self._may_hold(pid, key) for pid in takers):
            return self.with_family(key, takers)
        openers = self.openers(key)
        locked = [o.pid for o in openers if o.locked]
        if locked:
            return locked
        maybe = [o.pid for o in openers if o.locked is None and o.pid not in waiter_pids]
        return maybe or takers

    def _may_hold(self, pid: int, key: FileKey) -> bool:
        holds = self.holds(pid, key)
        if holds is None:
            # Its descriptors are closed to us (another user's process): alive,
            # it is taken at the kernel's word; dead, its heirs must be found.
            return os.path.exists(f"{self._proc}/{pid}")
        return holds

    def with_family(self, key: FileKey, pids: list[int]) -> list[int]:
        """``pids`` and the processes of their families that hold the flock on ``key`` too.

        The family is every descendant of ``pids`` and each ancestor that
        holds it (and in turn its descendants): the processes that can share
        the locked open file description by inheritance. A descriptor passed
        over a socket to an unrelated process, or a holder orphaned (its
        parent exited, so it was re-parented) while the taker lives, is not
        found this way; the full walk (:meth:`openers`) would find them at
        the cost of every process's descriptors.
        """
        found = list(dict.fromkeys(pids))
        seen = set(found)
        queue = list(found)
        for pid in found[:]:
            parent = proc_stat(pid, self._proc)
            while parent is not None and parent.ppid > 1 and parent.ppid not in seen:
                seen.add(parent.ppid)
                if not self._shares(parent.ppid, key):
                    break
                found.append(parent.ppid)
                queue.append(parent.ppid)
                parent = proc_stat(parent.ppid, self._proc)
        while queue:
            for child in children_of(queue.pop(), self._proc):
                if child in seen:
                    continue
                seen.add(child)
                # Descendants of one that let go are still asked: it may have
                # closed the file after forking them.
                queue.append(child)
                if self._shares(child, key):
                    found.append(child)
        return found

    def _shares(self, pid: int, key: FileKey) -> bool:
        """Whether ``pid`` has ``key`` open with a descriptor that holds (or may hold) its flock."""
        return key in (self.files_of(pid) or {}) and self.holds(pid, key) is not False
