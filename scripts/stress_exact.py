"""Exactness of diagnostics: what the audit log says of each lock, and whether a diagnosis matches.

At a sample the coordinator (``scripts/stress.py``) reads the audit log up
to now, derives an :class:`Expectation` for every lock, diagnoses every lock
(``scan()`` or one ``diagnose()`` each), reads the log again, and judges each
diagnosis with :func:`judge`:

* held exclusively by a live process (``E`` before the sample, no ``X`` by
  its end): ``HELD``, the record naming that process's pid *and* thread, the
  pid among ``.holders``;
* held shared: ``HELD`` (shared), every reader among ``.holders``;
* held by nobody: ``FREE`` or ``STALE_RECORD``;
* its killed holder (dead) handed the descriptor to a child program that
  still runs: ``ORPHANED``, the record naming the dead holder, the child
  among ``.holders``.

The grace. An ``E`` line is written after ``acquire`` returned — the flock
granted and the owner record written — and an ``X`` line before the release
starts, so a hold from ``E`` to ``X`` is certain: a held lock is judged with
no grace at all. The windows are on the other side (held, but the log does
not say so yet or any more), and instead of a timer the log brackets them:
``W`` (before an attempt) to ``E``/``F``, and ``X`` to ``R`` (after the
release returned); a killed process may hold until it is seen dead (``D``);
a child program from ``V`` until it is dead (``K``). A lock with an open
bracket, or with any line about it written while it was being diagnosed,
is not judged (*window*), and neither is one whose expected holder's pid
the log has not told yet. One window is the library's own and cannot be
bracketed from outside: a timed wait that gave up leaves its blocking
``flock`` to a helper thread, which takes the lock when the kernel grants it
and lets go at once. A lock the audit calls free but that the diagnosis
shows held, by processes that have such a left-behind wait on it, and by no
one else (``UNKNOWN_HOLDER``, or ``HELD`` shared for a reader's helper) is
counted as that window, separately; so is an extra holder that is a child
between its fork and the closing of the descriptors it inherited.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stress_audit import AuditLog, Holder, describe, state_name

EXPECTED_STATES = ("held", "shared", "free", "orphaned")


@dataclass
class Expectation:
    """What the audit log says a lock's diagnosis must be."""

    lock: str
    state: str  # one of EXPECTED_STATES, or "window"
    why: str = ""
    #: The processes whose lines can change this expectation (holders, the killed holder).
    wids: set[str] = field(default_factory=set)
    pid: int = 0
    thread: str = ""
    readers: dict[int, str] = field(default_factory=dict)  # pid -> holder, for messages
    inheritor: int = 0
    recorded_pid: int = 0
    #: Processes that may also appear among the holders (brackets open, child programs).
    allowed: set[int] = field(default_factory=set)
    #: Processes that may have a kernel-wait helper left behind on the lock.
    ghosts: set[int] = field(default_factory=set)

    def audit_says(self) -> str:
        if self.state == "held":
            return f"held exclusively by pid {self.pid} thread {self.thread!r}"
        if self.state == "shared":
            return "held shared by " + ", ".join(
                f"pid {pid} ({who})" for pid, who in sorted(self.readers.items())
            )
        if self.state == "orphaned":
            return (
                f"killed holder pid {self.recorded_pid} is dead; child pid {self.inheritor} "
                "that inherited the descriptor runs"
            )
        if self.state == "free":
            return "held by nobody" + (f" ({self.why})" if self.why else "")
        return f"window: {self.why}"


def expectations(audit: AuditLog, locks: list[str]) -> dict[str, Expectation]:
    """Every lock's expectation from the audit log as read so far."""
    return {lock: _expect(audit, lock) for lock in locks}


def _pids(audit: AuditLog, wids: set[str]) -> set[int]:
    return {pid for wid in wids if (pid := audit.pid(wid)) is not None}


def _expect(audit: AuditLog, lock: str) -> Expectation:  # noqa: PLR0911 - one return per case
    held = audit.holders.get(lock, {})
    live = {h: info for h, info in held.items() if not audit.is_killed(h[0])}
    killed = {h: info for h, info in held.items() if audit.is_killed(h[0])}
    bracket_wids = {
        h[0]
        for h, names in audit.attempts.items()
        if h[0] not in audit.dead and (lock in names or (lock in audit.slots and "s?" in names))
    }
    bracket_wids |= {h[0] for h in audit.releasing.get(lock, set()) if h[0] not in audit.dead}
    inherits = [i for (wid, name), i in audit.inherits.items() if name == lock]
    allowed = _pids(audit, bracket_wids) | {i.pid for i in inherits if i.pid}
    ghosts = _pids(audit, {w for w in audit.ghosts.get(lock, set()) if w not in audit.dead})
    for holder in list(live) + list(killed):
        if audit.pid(holder[0]) is None:
            return Expectation(lock, "window", f"the pid of {holder[0]} is not logged yet")
    writers = [(h, info) for h, info in live.items() if info.mode == "w"]
    if writers:
        (wid, _tid), info = writers[0]
        pid = audit.pid(wid) or 0
        return Expectation(lock, "held", wids={wid}, pid=pid, thread=info.thread, allowed=allowed)
    if live:
        readers = {audit.pid(h[0]) or 0: f"{h[0]}/t{h[1]}" for h in live}
        return Expectation(
            lock,
            "shared",
            wids={h[0] for h in live},
            readers=readers,
            allowed=allowed | ghosts,
            ghosts=ghosts,
        )
    undead = [h for h in killed if h[0] not in audit.dead]
    if undead:
        return Expectation(lock, "window", f"killed holder {undead[0][0]} not yet seen dead")
    for holder in killed:
        inheritance = audit.inherits.get((holder[0], lock))
        if inheritance is None:
            continue
        if inheritance.state != "I":
            return Expectation(lock, "window", f"child program of {holder[0]} {inheritance.state}")
        return Expectation(
            lock,
            "orphaned",
            wids={holder[0]},
            inheritor=inheritance.pid,
            recorded_pid=audit.pid(holder[0]) or 0,
            allowed=allowed,
        )
    if bracket_wids:
        return Expectation(lock, "window", f"open bracket of {sorted(bracket_wids)[0]}")
    if inherits:
        return Expectation(lock, "window", f"child program of {inherits[0].wid} not yet dead")
    return Expectation(lock, "free", ghosts=ghosts)


def window(expectation: Expectation, why: str) -> Expectation:
    return Expectation(expectation.lock, "window", why)


def during(
    expectation: Expectation, touches: list[tuple[str, str]], audit: AuditLog
) -> Expectation:
    """The expectation, given the lines about its lock written while it was being diagnosed.

    A held lock stays held unless its holder wrote ``X``, was killed or died
    (others can only wait: an ``E`` of theirs is a violation of its own);
    those others may show among the holders (a reader just entered, a
    waiter). A free or orphaned lock with any line about it is a window.
    """
    if not touches or expectation.state == "window":
        return expectation
    state = expectation.state
    changed = [(wid, what) for wid, what in touches if wid in expectation.wids]
    if state in ("held", "shared"):
        if any(what in ("X", "C", "D", "E") for _, what in changed):
            return window(expectation, "activity during the sample")
        expectation.allowed |= _pids(audit, {wid for wid, _ in touches})
        return expectation
    if state == "orphaned" and all(what in ("W", "F") for _, what in touches):
        return expectation
    return window(expectation, "activity during the sample")


def _holder_pids(diagnosis: Any) -> set[int]:
    return {h.pid for h in getattr(diagnosis, "holders", [])}


def judge(  # noqa: PLR0911 - one return per verdict
    expectation: Expectation, diagnosis: Any, unknown_ok: set[int] | None = None
) -> tuple[str, str]:
    """``("exact" | "miss" | "window" | "ghost" | "forking", why)`` for one diagnosis.

    ``unknown_ok`` are pids not announced in the log whose parent is one of
    ours: children between fork and closing their inherited descriptors.
    """
    kind = expectation.state
    if kind == "window":
        return "window", expectation.why
    if diagnosis is None:
        # scan() lists a slot file only once it has had a record: never held.
        if kind == "free":
            return "exact", "not listed (no record yet)"
        return "miss", "the lock is not in the scan"
    state = state_name(diagnosis)
    holders = _holder_pids(diagnosis)
    owner = getattr(diagnosis, "owner", None)
    owner = owner if isinstance(owner, dict) else {}
    shared = bool(getattr(diagnosis, "shared", False))
    extra = holders - expectation.allowed
    # A holder's own children share its descriptor for a moment: a forked one
    # until its at-fork handler closes what it inherited (its pid is logged by
    # the parent first), a child program between its start and the line that
    # names it, or on its way out. The kernel counts them among the holders,
    # and so do diagnostics; a child keeping a lock its parent let go is still
    # caught, as a FREE expectation.
    parents = {expectation.pid, *expectation.readers}
    extra -= {h.pid for h in getattr(diagnosis, "holders", []) if getattr(h, "ppid", 0) in parents}
    if kind == "free":
        if state in ("FREE", "STALE_RECORD"):
            return "exact", ""
        takers = holders | set(getattr(diagnosis, "lock_pids", ()))
        if (
            (state == "UNKNOWN_HOLDER" or (state == "HELD" and shared))
            and takers
            and takers <= expectation.ghosts
        ):
            return "ghost", f"held by {sorted(takers)}, each with a left-behind kernel wait"
        return "miss", f"{state}, expected FREE or STALE_RECORD"
    if kind == "held":
        extra.discard(expectation.pid)
        problems = []
        if state != "HELD" or shared:
            problems.append(f"state {state}{' (shared)' if shared else ''}, expected HELD")
        if owner.get("pid") != expectation.pid:
            problems.append(f"record pid {owner.get('pid')}, expected {expectation.pid}")
        if owner.get("thread") != expectation.thread:
            problems.append(
                f"record thread {owner.get('thread')!r}, expected {expectation.thread!r}"
            )
        if expectation.pid not in holders:
            problems.append(f"pid {expectation.pid} not among holders {sorted(holders)}")
    elif kind == "shared":
        extra -= set(expectation.readers)
        problems = []
        if state != "HELD" or not shared:
            problems.append(f"state {state}{' (shared)' if shared else ''}, expected HELD shared")
        missing = set(expectation.readers) - holders
        if missing:
            problems.append(f"readers {sorted(missing)} not among holders {sorted(holders)}")
    else:  # orphaned
        extra.discard(expectation.inheritor)
        problems = []
        if state != "ORPHANED":
            problems.append(f"state {state}, expected ORPHANED")
        if expectation.inheritor not in holders:
            problems.append(
                f"child pid {expectation.inheritor} not among holders {sorted(holders)}"
            )
        if owner.get("pid") != expectation.recorded_pid:
            problems.append(f"record pid {owner.get('pid')}, expected {expectation.recorded_pid}")
    if problems:
        return "miss", "; ".join(problems)
    if extra:
        if unknown_ok is not None and extra <= unknown_ok:
            return "forking", f"extra holders {sorted(extra)}: children still closing descriptors"
        return "miss", f"extra holders {sorted(extra)} that the audit does not explain"
    return "exact", ""


def _holder_type(wid: str) -> str:
    """What kind of process ``wid`` names: a worker, its forked child, or its fork pool's worker."""
    last = wid.rsplit(".", 1)[-1]
    if wid.count(".") >= 2 and last[:1] == "f":
        return "fork child"
    if wid.count(".") >= 2 and last[:1] == "q":
        return "fork pool worker"
    return "worker"


@dataclass
class Tally:
    """Exactness counts per expected state, lock kind and method, and every miss with its sample."""

    judged: Counter[tuple[str, str]] = field(default_factory=Counter)  # (axis value, verdict)
    misses: list[str] = field(default_factory=list)
    windows: Counter[str] = field(default_factory=Counter)

    def add(
        self,
        sample: int,
        *,
        method: str,
        kind: str,
        expectation: Expectation,
        diagnosis: Any,
        verdict: str,
        why: str,
    ) -> str | None:
        """Count one judgement; return the miss's text if it was one."""
        if verdict == "window":
            self.windows[why.split(" of ", maxsplit=1)[0].split(" not ", maxsplit=1)[0]] += 1
            return None
        if verdict in ("ghost", "forking"):
            self.windows[verdict] += 1
            return None
        axes = [f"state:{expectation.state}", f"kind:{kind}", f"method:{method}"]
        axes += [
            f"holder:{holder}" for holder in sorted({_holder_type(w) for w in expectation.wids})
        ]
        for axis in axes:
            self.judged[(axis, verdict)] += 1
        if verdict != "miss":
            return None
        text = (
            f"MISS sample {sample} ({method}) {expectation.lock} [{kind}]: audit says "
            f"{expectation.audit_says()}; diagnosis: {why}; "
            f"{describe(diagnosis) if diagnosis is not None else 'none'}"
        )
        self.misses.append(text)
        return text

    def rows(self, axis: str) -> list[tuple[str, int, int]]:
        """(value, exact, sampled) for one axis: ``state``, ``kind``, ``method`` or ``holder``."""
        values = sorted({key[0] for key in self.judged if key[0].startswith(axis + ":")})
        return [
            (
                value.split(":", 1)[1],
                self.judged[(value, "exact")],
                self.judged[(value, "exact")] + self.judged[(value, "miss")],
            )
            for value in values
        ]

    @property
    def exact(self) -> int:
        return sum(
            n
            for (axis, verdict), n in self.judged.items()
            if axis.startswith("state:") and verdict == "exact"
        )

    @property
    def sampled(self) -> int:
        return sum(
            n
            for (axis, verdict), n in self.judged.items()
            if axis.startswith("state:") and verdict in ("exact", "miss")
        )


__all__ = ["Expectation", "Holder", "Tally", "during", "expectations", "judge", "window"]
