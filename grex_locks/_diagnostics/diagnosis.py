"""Who holds a lock, since when, and is it safe to wait: the kernel's truth, explained.

The kernel decides whether a lock is held (:mod:`.kernel_lock_table`); the
owner record only explains it. :func:`~.diagnose.diagnose` compares the two
and names one :class:`HolderState`. It never takes a lock, never creates or
changes a file, reads a record only if it is a regular file of at most
64 KiB, and never raises on a garbage record or on any pid a record names.
psutil is asked only about the processes that matter: the record's pid,
the holders and the waiters.
"""

from __future__ import annotations

import enum
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from .lock_names import lock_kind

#: No Linux pid exceeds 2**22 (``pid_max``'s ceiling); larger ones are garbage.
_PID_MAX = 1 << 22
#: psutil's names for a process that cannot run until it is continued.
STOPPED_STATUSES = frozenset({psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP})


class HolderState(enum.Enum):
    """What a lock's holder is, judged from the kernel and explained by the record.

    ``UNREADABLE``: the lock (or the directory it would be in) could not be
    inspected — permission denied, or another error from the OS — so whether
    it is held is unknown; it is never reported ``FREE``.
    """

    FREE = "free"
    HELD = "held"
    STALE_RECORD = "stale_record"
    ORPHANED = "orphaned"
    UNKNOWN_HOLDER = "unknown_holder"
    REMOTE = "remote"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Holder:
    """A live process that holds (or waits for) a lock, as psutil saw it.

    ``ppid`` is its parent's pid; ``parent`` the parent's command line, looked
    up only for a stopped process (whoever stopped it is usually its parent).
    """

    pid: int
    name: str
    cmdline: list[str] = field(hash=False)
    status: str
    username: str
    create_time: float
    ppid: int = 0
    parent: str = ""

    @classmethod
    def of_pid(cls, pid: int) -> Holder | None:
        """Describe process ``pid``; ``None`` if there is no such (living) process."""
        if not 0 < pid <= _PID_MAX:
            return None
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                status = _ask(proc.status, "unknown")
                if status == psutil.STATUS_ZOMBIE:
                    return None  # a zombie has closed every descriptor: it holds nothing
                ppid = _ask(proc.ppid, 0)
                holder = cls(
                    pid=pid,
                    name=_ask(proc.name, ""),
                    cmdline=_ask(proc.cmdline, []),
                    status=status,
                    username=_ask(proc.username, ""),
                    create_time=_ask(proc.create_time, 0.0),
                    ppid=ppid,
                )
        except psutil.NoSuchProcess:
            return None
        except (psutil.Error, OSError, ValueError, OverflowError):
            return cls(pid, "", [], "unknown", "", 0.0)
        if status in STOPPED_STATUSES and ppid > 0:
            return replace(holder, parent=_command_of(ppid))
        return holder

    @property
    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP, job control, a tracer) and cannot run."""
        return self.status in STOPPED_STATUSES

    def command(self) -> str:
        """The command line, short: program name first, as a person would type it."""
        return _short_command(self.cmdline) or clean(self.name)


def _command_of(pid: int) -> str:
    """Process ``pid``'s command line, short; ``""`` if it cannot be had."""
    try:
        proc = psutil.Process(pid)
        return _short_command(_ask(proc.cmdline, [])) or clean(_ask(proc.name, ""))
    except (psutil.Error, OSError, ValueError, OverflowError):
        return ""


def _ask(call: Any, default: Any) -> Any:
    try:
        return call()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return default


def clean(text: str, limit: int = 60) -> str:
    """``text`` fit for one line of a terminal: no control characters, at most ``limit`` long."""
    return _cut(" ".join(_printable(text).split()), limit)


def _printable(text: str) -> str:
    if text.isprintable():  # the common case, tested in C; a command line can be 8 KiB
        return text
    return "".join(c if c.isprintable() else " " for c in text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_command(argv: object) -> str:
    """A command line as a person would type it (``shlex.join``), program name first, short.

    Each word is quoted as a shell needs it, so ``sh -c 'sleep 10'`` reads as
    one argument after ``-c``, not three words.
    """
    if not isinstance(argv, list) or not argv:
        return ""
    limit = 60
    quoted: list[str] = []
    length = -1
    for word in [os.path.basename(str(argv[0])), *argv[1:]]:
        quoted.append(shlex.quote(_printable(str(word))))
        length += len(quoted[-1]) + 1
        if length > limit:
            break  # the rest would be cut off anyway
    return _cut(" ".join(quoted), limit)


def _observer() -> tuple[int, int]:
    return (os.getpid(), os.getppid())


@dataclass(frozen=True)
class Diagnosis:
    """One lock, diagnosed: its state, the record, and who holds or waits for it.

    ``holders`` come from the kernel and the processes' open files, never
    from the record. ``waiters`` are processes blocked waiting for the lock.
    ``lock_pids`` are the pids the kernel lists as having *taken* the lock
    (possibly dead). ``kernel_visible`` is ``False`` where the kernel's lock
    table cannot be read: the state is then judged from the record alone.

    ``lock_file_type`` is set when something other than a regular file sits
    at the lock path (``"directory"``, ``"symlink"``, ``"FIFO"``, ...): no
    grex_locks acquire can use it. ``record_file_type`` likewise for the
    record path. ``record_at`` is where the record was read when that is
    not beside ``path`` (another hard-link name of the same lock file);
    ``record_user`` the user owning the record file, when it is a file.
    ``record_host`` is the host the record names when that is not the host
    that diagnosed (its pid means nothing here). ``observer`` is
    ``(pid, parent pid)`` of the process that diagnosed.
    """

    path: Path
    state: HolderState
    owner: dict[str, Any] | None = None
    holders: list[Holder] = field(default_factory=list)
    waiters: list[Holder] = field(default_factory=list)
    lock_pids: tuple[int, ...] = ()
    shared: bool = False
    record_problem: str = ""
    note: str = ""
    kernel_visible: bool = True
    diagnosed_at: float = field(default_factory=time.time)
    lock_file_type: str = ""
    record_file_type: str = ""
    record_at: Path | None = None
    record_user: str = ""
    observer: tuple[int, int] = field(default_factory=_observer)
    record_host: str = ""

    @property
    def kind(self) -> str:
        """What kind of grex lock this is ("pack lock", "workspace sync lock", ...), or "lock"."""
        return lock_kind(self.path, self.owner)

    @property
    def usable(self) -> bool:
        """Whether an acquire can use this path at all (a regular file, or none yet)."""
        return not self.lock_file_type and self.state is not HolderState.UNREADABLE

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as plain JSON values (``state`` by name), valid for strict parsers.

        A byte of a path or command line that is not UTF-8 appears as the
        four characters ``\\xNN`` (see :func:`strict_text`).
        """
        plain: dict[str, Any] = _plain(
            {
                "path": str(self.path),
                "state": self.state.name,
                "kind": self.kind,
                "owner": _plain(self.owner),
                "holders": [_plain(asdict(h)) for h in self.holders],
                "waiters": [_plain(asdict(w)) for w in self.waiters],
                "lock_pids": list(self.lock_pids),
                "shared": self.shared,
                "record_problem": self.record_problem,
                "record_file_type": self.record_file_type,
                "record_at": str(self.record_at) if self.record_at is not None else None,
                "record_user": self.record_user,
                "lock_file_type": self.lock_file_type,
                "note": self.note,
                "kernel_visible": self.kernel_visible,
                "summary": self.holder_summary(),
            }
        )
        return plain

    # -- words -----------------------------------------------------------------

    def recorded(self, key: str) -> Any:
        """The record's ``key``, cleaned for a terminal if it is a string; ``None`` if absent."""
        value = self.owner.get(key) if isinstance(self.owner, dict) else None
        return clean(value) if isinstance(value, str) else value

    def holder(self, pid: int) -> Holder | None:
        """The holder with ``pid``, if it is one."""
        return next((h for h in self.holders if h.pid == pid), None)

    def relation(self, pid: object, *, portable: bool = False) -> str:
        """How ``pid`` relates to the process that diagnosed: ``"this process's own parent"``...

        ``portable``: in words that stay true wherever they are read. An
        error's message is made once, in the process refused, and may be
        read in another (a pool's parent), where "this process" would be
        wrong; there the asking pid is named instead.
        """
        me, parent = self.observer
        here = me == os.getpid() and not portable
        if pid == parent:
            return "this process's own parent" if here else f"the parent of pid {me}, which asked"
        if pid == me:
            return "this very process" if here else f"pid {me} itself, which asked"
        return ""

    def _who(self, pid: int, *, marks: bool = True) -> str:
        holder = self.holder(pid)
        command = holder.command() if holder else _short_command(self.recorded("argv"))
        text = f"pid {pid} ({command})" if command else f"pid {pid}"
        if marks:
            if holder is not None and holder.stopped:
                text += ", stopped"
            relation = self.relation(pid, portable=True)
            if relation:
                text += f" — {relation}"
        return text

    def held_for(self) -> float | None:
        """Seconds since the record says the lock was taken, if it says so plausibly."""
        started = finite_seconds(self.recorded("acquired_at"))
        if started is not None and 0 <= self.diagnosed_at - started < 10 * 365 * 86400:
            return self.diagnosed_at - started
        return None

    def _since(self) -> str:
        thread, age = self.recorded("thread"), self.held_for()
        text = f", thread {thread}" if isinstance(thread, str) and thread else ""
        return text if age is None else f"{text}, for {age:.1f} s"

    def _held_exclusively(self, pid: int) -> str:
        text = f"held by {self._who(pid, marks=False)}{self._since()}"
        holder = self.holder(pid)
        if holder is not None and holder.stopped:
            text += f"; it is stopped (`kill -CONT {pid}` continues it)"
        relation = self.relation(pid, portable=True)
        return f"{text} — {relation}" if relation else text

    def holder_summary(self) -> str:
        """Who holds the lock, in a clause for an error message; ``""`` when nothing is known."""
        pids = [h.pid for h in self.holders]
        state, recorded = self.state, self.recorded("pid")
        if state is HolderState.HELD and self.shared:
            count = len(pids) or len(self.lock_pids)
            readers = f"{count} reader{'' if count == 1 else 's'}" if count else "readers"
            who = ", ".join(self._who(p) for p in pids)
            text = f"held shared by {readers}: {who}" if who else f"held shared by {readers}"
            if not who:
                text += " that cannot be identified"
        elif state is HolderState.HELD:
            text = self._held_exclusively(pids[0] if pids else recorded)
        elif state is HolderState.REMOTE:
            host = self.recorded("hostname")
            text = f"recorded as held by pid {recorded} on host {host}{self._since()}"
        elif state in (HolderState.ORPHANED, HolderState.UNKNOWN_HOLDER):
            text = self._held_by_another(pids, recorded)
        else:
            return ""
        if self.waiters:
            text += f"; {len(self.waiters)} waiting"
        return text

    def _held_by_another(self, pids: list[int], recorded: object) -> str:
        """The ``ORPHANED`` / ``UNKNOWN_HOLDER`` clause: who holds it, how the record differs."""
        who = ", ".join(self._who(p) for p in pids) or "a process that cannot be identified"
        named = isinstance(recorded, int) and not self.record_problem
        if named and recorded in pids:
            # A live process with the recorded pid holds it, yet the verdict is
            # not HELD: it is not the process the record describes.
            return (
                f"held by {who}, not by the process its owner record names: that one had "
                f"pid {recorded} too, and is gone"
            )
        if self.state is HolderState.ORPHANED:
            return f"held by {who}, inherited from pid {recorded}, which is gone"
        host = f" on host {clean(self.record_host)}" if self.record_host else ""
        return f"held by {who}, " + (
            f"not by pid {recorded}{host} that its owner record names"
            if named
            else "with no usable owner record"
        )

    def waiting_line(self) -> str:
        """``"3 waiting behind pid 4242"``, or ``""`` when nobody waits."""
        if not self.waiters:
            return ""
        behind = [str(h.pid) for h in self.holders] or [str(p) for p in self.lock_pids]
        target = f"pid {', '.join(behind)}" if behind else "an unidentified holder"
        return f"{len(self.waiters)} waiting behind {target}"

    def explain(self) -> str:
        """One paragraph a person can act on: what holds the lock and what to do about it."""
        from .explain import explain  # noqa: PLC0415 - the words live beside, not above, the data

        return explain(self)


def finite_seconds(value: object) -> float | None:
    """``value`` as a finite float if a record's number can be one (a 400-digit int cannot)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """``value`` as strict JSON accepts it: non-finite floats as None, strings valid Unicode."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return strict_text(value)
    if isinstance(value, Path):
        return strict_text(str(value))
    if isinstance(value, dict):
        return {strict_text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def strict_text(text: str) -> str:
    """``text`` without lone surrogates, which strict JSON parsers refuse.

    Python carries a byte of a file name or command line that is not UTF-8
    as a lone surrogate (``os.fsdecode``'s ``surrogateescape``: byte 0xff is
    ``"\\udcff"``). Each such byte is written as the four characters
    ``\\xff``, as ``bytes.decode(..., "backslashreplace")`` would; any other
    lone surrogate (a record's own ``"\\ud800"``) as the six characters
    ``\\ud800``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_strict_char(c) for c in text)
    return text


def _strict_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return char
