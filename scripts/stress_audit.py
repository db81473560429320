"""The invariant checks of ``scripts/stress.py``: audit log, manifest, and diagnostics.

* :class:`AuditLog` follows the O_APPEND audit log as it grows. Every process
  that takes locks (workers, their forked children ``<wid>.f<pid>``, their
  fork pools' workers ``<wid>.q<pid>``) brackets each lock with lines
  ``<wid> <tid> W|E|F|X|R <lock> <mode> [style|thread]``: ``W`` before an
  attempt, ``E`` once held (after acquire returned), ``F`` when the attempt
  failed, ``X`` just before the release and ``R`` after it. In the log's
  order no two holders of one lock may overlap between ``E`` and ``X``
  (readers excepted).

  Other lines: ``P <wid> <pid> <start>`` (a process announces itself),
  ``D <wid>`` (it is dead: reaped by its parent or seen gone by the
  coordinator), ``C kill <wid>`` (the coordinator or a parent is about to
  SIGKILL ``wid``; its descendants die with it), ``V <wid> <tid> <lock>`` (a
  thread is about to hand the lock's descriptor to a child program),
  ``I <wid> <lock> <pid>`` (that program runs: from now on it holds the lock
  too), ``J <wid> <lock> <pid>`` (it is about to exit), ``K <wid> <lock> <pid>``
  (it is dead).

  A holder's unmatched ``E`` may be overtaken only after its kill line — and
  only once the child program it handed the lock to has ended; the killed
  process must never write another line after being overtaken (that would
  prove it was alive while the lock was held twice).
* :func:`check_manifest`: every acknowledged append is present as a whole line.
* :class:`Diagnostics` runs ``grex_locks.scan()``/``diagnose()`` and checks
  the audit against each holder's ``/proc/<pid>/fdinfo``; ``stress_exact``
  judges each diagnosis against what the audit says.
"""

from __future__ import annotations

import importlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stress_worker import TIMED_STYLES, record_line

Holder = tuple[str, str]  # (wid, thread index)
Event = tuple[str, str, str, str, str]  # wid, tid, W|E|F|X|R, lock, r|w


@dataclass
class HoldInfo:
    """One ``E`` not yet matched by its ``X``."""

    mode: str
    thread: str


@dataclass
class Inheritance:
    """A lock's descriptor handed by ``wid`` to a child program: V, then I (runs), J (ends), K."""

    wid: str
    lock: str
    state: str
    pid: int = 0
    overtaken: bool = False


def ancestry(wid: str) -> list[str]:
    """``wid`` and the names it descends from: ``w1.2.f33`` -> ``w1.2.f33``, ``w1.2``, ``w1``."""
    names = [wid]
    while "." in wid:
        wid = wid.rsplit(".", 1)[0]
        names.append(wid)
    return names


@dataclass
class AuditLog:
    """The audit log, parsed incrementally, with every lock's holders and brackets as of its end."""

    path: Path
    slots: tuple[str, ...] = ("s0", "s1")
    violations: list[str] = field(default_factory=list)
    holders: dict[str, dict[Holder, HoldInfo]] = field(default_factory=lambda: defaultdict(dict))
    attempts: dict[Holder, set[str]] = field(default_factory=lambda: defaultdict(set))
    releasing: dict[str, set[Holder]] = field(default_factory=lambda: defaultdict(set))
    killed: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    overtaken: set[str] = field(default_factory=set)
    procs: dict[str, tuple[int, int]] = field(default_factory=dict)
    inherits: dict[tuple[str, str], Inheritance] = field(default_factory=dict)
    #: lock -> processes that may have a kernel-wait helper left behind on it.
    ghosts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: Lock -> (wid, line kind) of every line about it since :meth:`clear_touched`.
    touched: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    lines: int = 0
    takeovers: int = 0
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> list[Event]:
        """Read and check whatever was appended since the last poll; return its lock events."""
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

    def clear_touched(self) -> None:
        self.touched.clear()

    def _touch(self, locks: Iterable[str], wid: str, what: str) -> None:
        for lock in locks:
            self.touched[lock].append((wid, what))

    # -- who is who ---------------------------------------------------------------

    def is_killed(self, wid: str) -> bool:
        """Whether ``wid`` or a process it descends from was sent SIGKILL."""
        return any(name in self.killed for name in ancestry(wid))

    def pid(self, wid: str) -> int | None:
        found = self.procs.get(wid)
        return found[0] if found else None

    def wids_of(self, pid: int) -> list[str]:
        return [wid for wid, (p, _) in self.procs.items() if p == pid]

    def _names(self, lock: str) -> tuple[str, ...]:
        return self.slots if lock == "s?" else (lock,)

    def locks_of(self, wids: Iterable[str]) -> set[str]:
        """Every lock on which one of ``wids`` has an open bracket or a handed-on descriptor."""
        wanted = set(wids)
        found = {lock for lock, held in self.holders.items() for h in held if h[0] in wanted}
        found |= {lock for lock, rel in self.releasing.items() for h in rel if h[0] in wanted}
        for holder, names in self.attempts.items():
            if holder[0] in wanted:
                found.update(n for name in names for n in self._names(name))
        found |= {lock for (wid, lock) in self.inherits if wid in wanted}
        return found

    def family(self, root: str) -> list[str]:
        """``root`` and every process known to descend from it."""
        return [wid for wid in self.procs if root in ancestry(wid)] or [root]

    # -- lines ---------------------------------------------------------------------

    def _apply(self, line: str) -> Event | None:  # noqa: PLR0911 - one branch per line kind
        self.lines += 1
        parts = line.split()
        if not parts:
            self.violations.append(f"unparseable audit line {line!r}")
            return None
        head = parts[0]
        try:
            if head == "C" and len(parts) == 3 and parts[1] == "kill":
                self.killed.add(parts[2])
                for wid in self.family(parts[2]):
                    self._touch(self.locks_of([wid]), wid, "C")
                return None
            if head == "P" and len(parts) == 4:
                self.procs[parts[1]] = (int(parts[2]), int(parts[3]))
                return None
            if head == "D" and len(parts) == 2:
                self._died(parts[1])
                return None
            if head in ("V", "I", "J", "K") and len(parts) == 4:
                self._inheritance(head, parts)
                return None
        except ValueError:
            pass
        if len(parts) not in (5, 6) or parts[2] not in "WEFXR" or parts[4] not in ("r", "w"):
            self.violations.append(f"unparseable audit line {line!r}")
            return None
        wid, tid, what, lock, mode = parts[:5]
        extra = parts[5] if len(parts) == 6 else ""
        if wid in self.overtaken:
            self.violations.append(
                f"{wid} wrote {line!r} after another process took over a lock it held at its "
                "kill: it was alive while the lock was held twice"
            )
        me = (wid, tid)
        self._touch(self._names(lock), wid, what)
        if what == "W":
            self.attempts[me].add(lock)
            if extra in TIMED_STYLES and lock == "s?":
                for name in self.slots:  # a permit waits on every slot at once
                    self.ghosts[name].add(wid)
            return (wid, tid, what, lock, mode)
        if what == "F":
            self.attempts[me].discard(lock)
            if extra in TIMED_STYLES:
                for name in self._names(lock):
                    self.ghosts[name].add(wid)
            return (wid, tid, what, lock, mode)
        if what == "R":
            self.releasing[lock].discard(me)
            return (wid, tid, what, lock, mode)
        held = self.holders[lock]
        if what == "X":
            if held.pop(me, None) is None:
                self.violations.append(f"exit without enter: {line!r}")
            else:
                self.releasing[lock].add(me)
            return (wid, tid, what, lock, mode)
        # E
        self.attempts[me].discard(lock)
        if lock in self.slots:
            self.attempts[me].discard("s?")
        if me in held:
            self.violations.append(f"entered twice without exit: {line!r}")
        for other, info in list(held.items()):
            if mode == "r" and info.mode == "r":
                continue
            if self.is_killed(other[0]) or other[0] in self.dead:
                self._take_over(other, lock, line)
                del held[other]
                continue
            self.violations.append(
                f"mutual exclusion broken on {lock}: {wid}/t{tid} ({mode}) entered while "
                f"{other[0]}/t{other[1]} ({info.mode}) held it"
            )
        held[me] = HoldInfo(mode, extra or f"{wid}-t{tid}")
        return (wid, tid, what, lock, mode)

    def _take_over(self, other: Holder, lock: str, line: str) -> None:
        """A killed (or dead) holder's lock taken by another: fine unless a child still holds it."""
        inheritance = self.inherits.get((other[0], lock))
        if inheritance is not None:
            if inheritance.state == "I":
                self.violations.append(
                    f"mutual exclusion broken on {lock}: {line!r} entered while pid "
                    f"{inheritance.pid}, which inherited it from the killed {other[0]}, held it"
                )
            inheritance.overtaken = True
        self.overtaken.add(other[0])
        self.takeovers += 1

    def _died(self, wid: str) -> None:
        """``wid`` is dead: it holds nothing, and its open brackets are closed."""
        self._touch(self.locks_of([wid]), wid, "D")
        self.dead.add(wid)
        for holder in [h for h in self.attempts if h[0] == wid]:
            del self.attempts[holder]
        for rel in self.releasing.values():
            for holder in [h for h in rel if h[0] == wid]:
                rel.discard(holder)
        if any(h[0] == wid for held in self.holders.values() for h in held):
            # Died inside a lock: the kernel let go. Treated as killed from here on.
            self.killed.add(wid)

    def _inheritance(self, head: str, parts: list[str]) -> None:
        if head == "V":
            _, wid, _tid, lock = parts
            self.inherits[(wid, lock)] = Inheritance(wid, lock, "V")
            self._touch([lock], wid, head)
            return
        _, wid, lock, pid = parts
        self._touch([lock], wid, head)
        inheritance = self.inherits.setdefault((wid, lock), Inheritance(wid, lock, "V"))
        if head == "I":
            inheritance.pid = int(pid)
            if inheritance.overtaken:
                self.violations.append(
                    f"mutual exclusion broken on {lock}: pid {pid}, which inherited it from "
                    f"the killed {wid}, started after another process took it over"
                )
        if head == "K":
            del self.inherits[(wid, lock)]
        elif inheritance.state != "J":
            inheritance.state = head

    # -- views ---------------------------------------------------------------------

    def live_holds(self) -> dict[str, set[Holder]]:
        """Lock -> holders now, leaving out processes that were sent SIGKILL."""
        return {
            lock: {h for h in held if not self.is_killed(h[0])}
            for lock, held in self.holders.items()
            if any(not self.is_killed(h[0]) for h in held)
        }

    def holding(self, wid: str) -> bool:
        return any(wid in ancestry(h[0]) for held in self.holders.values() for h in held)

    def live_inheritance(self, wid: str) -> bool:
        """Whether a child program holds a lock ``wid`` handed it (the kill that makes ORPHANED)."""
        return any(i.wid == wid and i.state == "I" for i in self.inherits.values())

    def undead(self) -> list[tuple[str, int, int]]:
        """Killed processes not yet seen dead: (wid, pid, start)."""
        return [
            (wid, pid, start)
            for wid, (pid, start) in self.procs.items()
            if wid not in self.dead and self.is_killed(wid)
        ]

    def finish(self) -> None:
        """At the end of the run: only killed processes may have an unmatched enter."""
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


def library(name: str) -> Callable[..., Any] | None:
    """``grex_locks.<name>``, else ``grex_locks.<name>.<name>``; None while the library lacks it."""
    import grex_locks

    found = getattr(grex_locks, name, None)
    if not callable(found):
        try:
            found = getattr(importlib.import_module(f"grex_locks.{name}"), name, None)
        except ImportError:
            return None
    return found if callable(found) else None


def is_dead(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` (clock ticks) has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0] in (b"Z", b"X") or (start != 0 and int(fields[19]) != start)


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


def state_name(diagnosis: Any) -> str:
    state = getattr(diagnosis, "state", None)
    return str(getattr(state, "name", state))


def _pid_and_start(diagnosis: Any) -> tuple[Any, Any]:
    owner = getattr(diagnosis, "owner", None)
    if not isinstance(owner, dict):
        return None, None
    return owner.get("pid"), owner.get("create_time")


@dataclass
class Diagnostics:
    """``scan()`` and ``diagnose()``, and the kernel lock table, judged against the audit."""

    root: Path
    lock_files: dict[str, Path]
    scans: int = 0
    judged: int = 0
    scan: Callable[..., Any] | None = field(default=None, init=False)
    diagnose: Callable[..., Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.scan = library("scan")
        self.diagnose = library("diagnose")

    @property
    def available(self) -> bool:
        return self.scan is not None

    def snapshot(self) -> list[Any]:
        """One ``scan()`` of the run's tree (empty while the library lacks it)."""
        self.scans += 1
        return list(self.scan(self.root)) if self.scan is not None else []

    def each(self) -> list[Any]:
        """``diagnose()`` of every lock of the run, one by one."""
        self.scans += 1
        if self.diagnose is None:
            return self.snapshot()
        return [self.diagnose(path) for path in self.lock_files.values()]

    def judge(
        self,
        diagnoses: list[Any],
        held: dict[str, set[Holder]],
        kernel: dict[tuple[str, str], bool | None],
        dead: dict[int, float],
    ) -> list[str]:
        """Violations: a lock held throughout the scan reported free, or HELD naming the dead.

        ``held`` must contain only holds whose ``enter`` precedes the scan and
        whose ``exit`` follows it, by processes alive all along; ``kernel``
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
            elif state_name(found) in ("FREE", "STALE_RECORD"):
                problems.append(
                    f"scan() says {path} is {state_name(found)} while {sorted(holders)} held it "
                    f"throughout the scan: {describe(found)}"
                )
        for diagnosis in diagnoses:
            if state_name(diagnosis) != "HELD":
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
                        f"{describe(diagnosis)}"
                    )
        return problems

    def dump(self) -> str:
        """Every lock of the run that is not free, for a failure report."""
        if self.scan is None:
            return "(grex_locks.scan is not available)"
        lines = []
        for diagnosis in self.scan(self.root):
            if state_name(diagnosis) != "FREE":
                lines.append(f"  {describe(diagnosis)}")
        return "\n".join(lines) or "  (every lock free)"


def _same_start(recorded: Any, actual: float) -> bool:
    return isinstance(recorded, (int, float)) and abs(float(recorded) - actual) < 0.5


def describe(diagnosis: Any) -> str:
    to_dict = getattr(diagnosis, "to_dict", None)
    return repr(to_dict()) if callable(to_dict) else repr(diagnosis)
