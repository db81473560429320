"""The invariant checks of ``scripts/stress.py``: audit log, manifest, and diagnostics.

* :class:`AuditLog` follows the O_APPEND audit log as it grows. Workers write
  ``enter`` after taking a lock and ``exit`` before letting it go, so in the
  log's order no two holders of one lock may overlap (readers excepted). The
  coordinator writes ``C kill <wid>`` *before* it sends SIGKILL; a holder's
  unmatched ``enter`` may therefore be overtaken only after its kill line, and
  the killed worker must never write another line after being overtaken
  (that would prove it was alive while another process held its lock).
* :func:`check_manifest`: every acknowledged append is present as a whole line.
* :class:`Diagnostics` runs ``grex_locks.scan()`` (when the library has it)
  and checks it against the audit, and the audit against each holder's
  ``/proc/<pid>/fdinfo``.
"""

from __future__ import annotations

import importlib
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stress_worker import record_line

Holder = tuple[str, str]  # (wid, thread index)
Event = tuple[str, str, str, str, str]  # wid, tid, E|X, lock, r|w


@dataclass
class AuditLog:
    """The audit log, parsed incrementally, with the holders of every lock as of its end."""

    path: Path
    violations: list[str] = field(default_factory=list)
    holders: dict[str, dict[Holder, str]] = field(default_factory=lambda: defaultdict(dict))
    killed: set[str] = field(default_factory=set)
    overtaken: set[str] = field(default_factory=set)
    lines: int = 0
    takeovers: int = 0
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> list[Event]:
        """Read and check whatever was appended since the last poll; return its events."""
        events: list[Event] = []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            event = self._apply(raw.decode("ascii", "replace"))
            if event is not None:
                events.append(event)
        return events

    def _apply(self, line: str) -> Event | None:
        self.lines += 1
        parts = line.split()
        if len(parts) == 3 and parts[0] == "C":
            if parts[1] == "kill":
                self.killed.add(parts[2])
            return None
        if len(parts) != 5 or parts[2] not in ("E", "X") or parts[4] not in ("r", "w"):
            self.violations.append(f"unparseable audit line {line!r}")
            return None
        wid, tid, what, lock, mode = parts
        if wid in self.overtaken:
            self.violations.append(
                f"{wid} wrote {line!r} after another worker took over a lock it held at its kill: "
                "it was alive while the lock was held twice"
            )
        held, me = self.holders[lock], (wid, tid)
        if what == "X":
            if held.pop(me, None) is None:
                self.violations.append(f"exit without enter: {line!r}")
            return (wid, tid, what, lock, mode)
        if me in held:
            self.violations.append(f"entered twice without exit: {line!r}")
        for other, other_mode in list(held.items()):
            if mode == "r" and other_mode == "r":
                continue
            if other[0] in self.killed:
                # The kernel released a killed holder's lock; its enter stays unmatched.
                del held[other]
                self.overtaken.add(other[0])
                self.takeovers += 1
                continue
            self.violations.append(
                f"mutual exclusion broken on {lock}: {wid}/t{tid} ({mode}) entered while "
                f"{other[0]}/t{other[1]} ({other_mode}) held it"
            )
        held[me] = mode
        return (wid, tid, what, lock, mode)

    def live_holds(self) -> dict[str, set[Holder]]:
        """Lock -> holders now, leaving out workers that were sent SIGKILL."""
        return {
            lock: {h for h in held if h[0] not in self.killed}
            for lock, held in self.holders.items()
            if any(h[0] not in self.killed for h in held)
        }

    def holding(self, wid: str) -> bool:
        return any(h[0] == wid for held in self.holders.values() for h in held)

    def finish(self) -> None:
        """At the end of the run: only killed workers may have an unmatched enter."""
        self.poll()
        if self._partial:
            self.violations.append(f"audit log ends mid-line: {self._partial!r}")
        for lock, held in self.live_holds().items():
            self.violations.append(f"{lock} still held at the end by {sorted(held)}")


def check_manifest(path: Path, acked: set[tuple[str, int]]) -> tuple[list[str], int, int]:
    """Every acknowledged record present and whole: (violations, whole lines, torn lines)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")
    present = set(lines)
    whole = sum(1 for line in lines if line.startswith(b"{") and line.endswith(b"}"))
    torn = sum(1 for line in lines if line) - whole
    missing = sorted(key for key in acked if record_line(*key) not in present)
    problems = [f"acknowledged manifest record {w}#{s} is missing or torn" for w, s in missing[:20]]
    if len(missing) > 20:
        problems.append(f"... and {len(missing) - 20} more acknowledged records missing")
    return problems, whole, torn


def _library(name: str) -> Callable[..., Any] | None:
    """``grex_locks.<name>``, else ``grex_locks.<name>.<name>``; None while the library lacks it."""
    import grex_locks

    found = getattr(grex_locks, name, None)
    if not callable(found):
        try:
            found = getattr(importlib.import_module(f"grex_locks.{name}"), name, None)
        except ImportError:
            return None
    return found if callable(found) else None


def kernel_says_holds(pid: int, path: Path) -> bool | None:
    """Whether process ``pid`` holds a granted flock on ``path``, from its fdinfo; None: unknown."""
    try:
        st = os.stat(path)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.stat(f"/proc/{pid}/fd/{fd}")
            if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("lock:") and "FLOCK" in line and "->" not in line:
                return True
    return False


def _state(diagnosis: Any) -> str:
    state = getattr(diagnosis, "state", None)
    return str(getattr(state, "name", state))


def _pid_and_start(diagnosis: Any) -> tuple[Any, Any]:
    owner = getattr(diagnosis, "owner", None)
    if not isinstance(owner, dict):
        return None, None
    return owner.get("pid"), owner.get("create_time")


@dataclass
class Diagnostics:
    """``scan()`` and the kernel lock table, judged against the audit."""

    root: Path
    lock_files: dict[str, Path]
    scans: int = 0
    judged: int = 0
    scan: Callable[..., Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.scan = _library("scan")

    @property
    def available(self) -> bool:
        return self.scan is not None

    def snapshot(self) -> list[Any]:
        """One ``scan()`` of the run's tree (empty while the library lacks it)."""
        self.scans += 1
        return list(self.scan(self.root)) if self.scan is not None else []

    def judge(
        self,
        diagnoses: list[Any],
        held: dict[str, set[Holder]],
        kernel: dict[tuple[str, str], bool | None],
        dead: dict[int, float],
    ) -> list[str]:
        """Violations: a lock held throughout the scan reported free, or HELD naming the dead.

        ``held`` must contain only holds whose ``enter`` precedes the scan and
        whose ``exit`` follows it, by workers alive all along; ``kernel``
        says, per (lock, wid), whether the holder's own ``/proc/<pid>/fdinfo``
        showed the flock during the scan (exact, unlike a multi-page read of
        /proc/locks); ``dead`` maps the pid of every worker reaped before the
        scan to its start time.
        """
        problems: list[str] = []
        by_path = {Path(getattr(d, "path", "")): d for d in diagnoses}
        for lock, holders in sorted(held.items()):
            path = self.lock_files[lock]
            self.judged += 1
            for wid, _tid in holders:
                if kernel.get((lock, wid)) is False:
                    problems.append(f"the kernel shows no flock of {wid} on {lock} it holds")
            if self.scan is None:
                continue
            found = by_path.get(path)
            if found is None:
                problems.append(f"scan() did not list {path}, held by {sorted(holders)}")
            elif _state(found) in ("FREE", "STALE_RECORD"):
                problems.append(
                    f"scan() says {path} is {_state(found)} while {sorted(holders)} held it "
                    f"throughout the scan: {_describe(found)}"
                )
        for diagnosis in diagnoses:
            if _state(diagnosis) != "HELD":
                continue
            # A lock held only shared is HELD whatever its record says (a
            # killed writer's record may linger under live readers): then the
            # holders are what HELD names, not the record.
            named = [] if getattr(diagnosis, "shared", False) else [_pid_and_start(diagnosis)]
            named += [(h.pid, h.create_time) for h in getattr(diagnosis, "holders", [])]
            for pid, start in named:
                if isinstance(pid, int) and pid in dead and _same_start(start, dead[pid]):
                    problems.append(
                        f"scan() says HELD naming pid {pid}, a worker reaped before the scan: "
                        f"{_describe(diagnosis)}"
                    )
        return problems

    def dump(self) -> str:
        """Every lock of the run that is not free, for a failure report."""
        if self.scan is None:
            return "(grex_locks.scan is not available)"
        lines = []
        for diagnosis in self.scan(self.root):
            if _state(diagnosis) != "FREE":
                lines.append(f"  {_describe(diagnosis)}")
        return "\n".join(lines) or "  (every lock free)"


def _same_start(recorded: Any, actual: float) -> bool:
    return isinstance(recorded, (int, float)) and abs(float(recorded) - actual) < 0.5


def _describe(diagnosis: Any) -> str:
    to_dict = getattr(diagnosis, "to_dict", None)
    return repr(to_dict()) if callable(to_dict) else repr(diagnosis)
