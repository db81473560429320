"""Who holds a lock, since when, and is it safe to wait: the kernel's truth, explained.

The kernel decides whether a lock is held (:mod:`grex_locks.kernel_locks`);
the owner record only explains it. :func:`diagnose` compares the two and
names one :class:`HolderState`. It never takes a lock, never creates or
changes a file, reads a record only if it is a regular file of at most
64 KiB, and never raises on a garbage record or on any pid a record names.
psutil is asked only about the processes that matter: the record's pid,
the holders and the waiters.
"""

from __future__ import annotations

import enum
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: No Linux pid exceeds 2**22 (``pid_max``'s ceiling); larger ones are garbage.
_PID_MAX = 1 << 22


class HolderState(enum.Enum):
    """What a lock's holder is, judged from the kernel and explained by the record."""

    FREE = "free"
    HELD = "held"
    STALE_RECORD = "stale_record"
    ORPHANED = "orphaned"
    UNKNOWN_HOLDER = "unknown_holder"
    REMOTE = "remote"


@dataclass(frozen=True)
class Holder:
    """A live process that holds (or waits for) a lock, as psutil saw it."""

    pid: int
    name: str
    cmdline: list[str] = field(hash=False)
    status: str
    username: str
    create_time: float

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
                return cls(
                    pid=pid,
                    name=_ask(proc.name, ""),
                    cmdline=_ask(proc.cmdline, []),
                    status=status,
                    username=_ask(proc.username, ""),
                    create_time=_ask(proc.create_time, 0.0),
                )
        except psutil.NoSuchProcess:
            return None
        except (psutil.Error, OSError, ValueError, OverflowError):
            return cls(pid, "", [], "unknown", "", 0.0)

    def command(self) -> str:
        """The command line, short: program name first, as a person would type it."""
        return _short_command(self.cmdline) or _clean(self.name)


def _ask(call: Any, default: Any) -> Any:
    try:
        return call()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return default


def _clean(text: str, limit: int = 60) -> str:
    """``text`` fit for one line of a terminal: no control characters, at most ``limit`` long."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_command(argv: object) -> str:
    if not isinstance(argv, list) or not argv:
        return ""
    return _clean(" ".join([os.path.basename(str(argv[0])), *(str(word) for word in argv[1:])]))


@dataclass(frozen=True)
class Diagnosis:
    """One lock, diagnosed: its state, the record, and who holds or waits for it.

    ``holders`` come from the kernel and the processes' open files, never
    from the record. ``waiters`` are processes blocked waiting for the lock.
    ``lock_pids`` are the pids the kernel lists as having *taken* the lock
    (possibly dead). ``kernel_visible`` is ``False`` where the kernel's lock
    table cannot be read: the state is then judged from the record alone.
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

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as plain JSON values (``state`` by name)."""
        return {
            "path": str(self.path),
            "state": self.state.name,
            "owner": _plain(self.owner),
            "holders": [_plain(asdict(h)) for h in self.holders],
            "waiters": [_plain(asdict(w)) for w in self.waiters],
            "lock_pids": list(self.lock_pids),
            "shared": self.shared,
            "record_problem": self.record_problem,
            "note": self.note,
            "kernel_visible": self.kernel_visible,
            "summary": self.holder_summary(),
        }

    # -- words -----------------------------------------------------------------

    def _recorded(self, key: str) -> Any:
        value = self.owner.get(key) if isinstance(self.owner, dict) else None
        return _clean(value) if isinstance(value, str) else value

    def _who(self, pid: int) -> str:
        holder = next((h for h in self.holders if h.pid == pid), None)
        command = holder.command() if holder else _short_command(self._recorded("argv"))
        return f"pid {pid} ({command})" if command else f"pid {pid}"

    def held_for(self) -> float | None:
        """Seconds since the record says the lock was taken, if it says so plausibly."""
        started = finite_seconds(self._recorded("acquired_at"))
        if started is not None and 0 <= self.diagnosed_at - started < 10 * 365 * 86400:
            return self.diagnosed_at - started
        return None

    def recorded_command(self) -> str:
        """The command line the record names, short; ``""`` if it names none."""
        return _short_command(self._recorded("argv"))

    def _since(self) -> str:
        thread, age = self._recorded("thread"), self.held_for()
        text = f", thread {thread}" if isinstance(thread, str) and thread else ""
        return text if age is None else f"{text}, for {age:.1f} s"

    def holder_summary(self) -> str:
        """Who holds the lock, in a clause for an error message; ``""`` when nothing is known."""
        pids = [h.pid for h in self.holders]
        state, recorded = self.state, self._recorded("pid")
        if state is HolderState.HELD and self.shared:
            who = ", ".join(self._who(p) for p in pids) or "processes that cannot be identified"
            text = f"held shared by {who}"
        elif state is HolderState.HELD:
            text = f"held by {self._who(pids[0] if pids else recorded)}{self._since()}"
        elif state is HolderState.REMOTE:
            host = self._recorded("hostname")
            text = f"recorded as held by pid {recorded} on host {host}{self._since()}"
        elif state is HolderState.ORPHANED:
            who = ", ".join(self._who(p) for p in pids) or "a process that cannot be identified"
            text = f"held by {who}, inherited from pid {recorded}, which is gone"
        elif state is HolderState.UNKNOWN_HOLDER:
            who = ", ".join(self._who(p) for p in pids) or "a process that cannot be identified"
            named = isinstance(recorded, int) and not self.record_problem
            text = f"held by {who}, " + (
                f"not by pid {recorded} that its owner record names"
                if named
                else "with no usable owner record"
            )
        else:
            return ""
        if self.waiters:
            text += f"; {len(self.waiters)} waiting"
        return text

    def waiting_line(self) -> str:
        """``"3 waiting behind pid 4242"``, or ``""`` when nobody waits."""
        if not self.waiters:
            return ""
        behind = [str(h.pid) for h in self.holders] or [str(p) for p in self.lock_pids]
        target = f"pid {', '.join(behind)}" if behind else "an unidentified holder"
        return f"{len(self.waiters)} waiting behind {target}"

    def explain(self) -> str:
        """One paragraph a person can act on: what holds the lock and what to do about it."""
        pid, problem = self._recorded("pid"), self.record_problem
        stale = (
            f"is unreadable ({problem})" if problem else f"names pid {pid}, which does not hold it"
        )
        text = _ADVICE[self.state].format(
            path=self.path,
            summary=self.holder_summary(),
            note=_paren(self.note) if self.kernel_visible else "",
            stale=stale,
            host=self._recorded("hostname"),
        )
        if self.waiters:
            text += f" {self.waiting_line()}."
        if not self.kernel_visible:
            unknown = f"Whether the lock is held is unknown here{_paren(self.note)}"
            text = f"{unknown}; judged from the owner record alone: {text}"
        return text


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


_ADVICE = {
    HolderState.FREE: "{path} is free{note}: no process holds it; an acquire succeeds at once.",
    HolderState.STALE_RECORD: "{path} is free, but its owner record {stale}: it was left by a "
    "holder that ended without releasing the lock (most likely killed). It is harmless: the "
    "next holder replaces it, and `grex-locks doctor --prune` clears such records.",
    HolderState.HELD: "{path} is {summary}. The holder is alive, so waiting is safe: the lock "
    "is granted the moment it is released. If it seems stuck, look at what that process is "
    "doing (its logs, or `py-spy dump --pid PID`).",
    HolderState.ORPHANED: "{path} is {summary}{note}. The lock lives on in the processes that "
    "inherited its descriptor and is released when they exit; stop them if they should not "
    "be running.",
    HolderState.UNKNOWN_HOLDER: "{path} is {summary}{note}: a tool outside grex_locks (such as "
    "flock(1)) or a holder that has not recorded itself yet. Waiting is safe while it runs; "
    "check what that process is doing.",
    HolderState.REMOTE: "{path} is {summary}: the record names another host, so whether that "
    "process still runs cannot be checked here. Check on {host} (`grex-locks who` there); "
    "the record is never judged stale from here.",
}


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
    """``value`` with every non-finite float replaced by None, so strict JSON accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
