"""A diagnosis in one paragraph a person can act on.

Every sentence here says what grex_locks itself will do next — what an
acquire does, what ``grex-locks doctor --prune`` does — so each is tested
against that action. Nothing here advises deleting a lock file: only a
thing that is *not* a lock file (a directory or FIFO planted at a lock path,
a symlink or directory at a record path) is ever named for removal.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from grex_locks._core.owner_record import record_path

from .diagnosis import Diagnosis, Holder, HolderState
from .lock_names import WORKSPACE_SYNC
from .record_reader import is_content_problem


def explain(d: Diagnosis) -> str:
    """The paragraph :meth:`Diagnosis.explain` returns."""
    if d.state is HolderState.UNREADABLE:
        return _unusable(d) if d.lock_file_type else _unreadable(d)
    sentences = [_STATES[d.state](d)]
    if d.lock_file_type:
        sentences.append(_unusable(d, held=True))
    sentences += [
        _stopped(h, d, told=f"kill -CONT {h.pid}" in sentences[0]) for h in d.holders if h.stopped
    ]
    sentences.append(_parent(d))
    if d.record_at is not None:
        sentences.append(
            f"Its owner record was found beside another name of the same file (a hard "
            f"link): {d.record_at}."
        )
    if d.waiters:
        sentences.append(f"{d.waiting_line()}.")
    text = " ".join(s for s in sentences if s)
    if not d.kernel_visible and d.state is HolderState.HELD:
        return f"{text} ({d.note}.)" if d.note else text
    if not d.kernel_visible:
        unknown = f"Whether the lock is held is unknown here{_paren(d.note)}"
        text = f"{unknown}; judged from the owner record alone: {text}"
    return text


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def _note(d: Diagnosis) -> str:
    return _paren(d.note) if d.kernel_visible else ""


def _record(d: Diagnosis) -> Path:
    return record_path(d.path)


def _q(path: Path) -> str:
    """``path`` as a shell word, for a command a person pastes (spaces, quotes, ``$``...)."""
    return shlex.quote(str(path))


# -- the lock path itself ---------------------------------------------------------


def _unreadable(d: Diagnosis) -> str:
    text = (
        f"{d.path} cannot be inspected from here: {d.note or 'the system refused'}. Whether "
        "a lock there is held is unknown, so it is not reported free."
    )
    if not d.kernel_visible:
        ask = ", or ask the process its owner record names" if d.owner is not None else ""
        return (
            f"{text} Run this where the kernel's lock table can be read (on Linux, "
            f"/proc/locks; as root if it is closed to this user){ask}."
        )
    return (
        f"{text} Run this as a user who may read that directory (its owner, or root), or "
        "fix its permissions."
    )


def _move_aside(path: Path, file_type: str) -> str:
    quoted, moved = shlex.quote(str(path)), shlex.quote(f"{path}.moved")
    move = f"move it aside (`mv {quoted} {moved}`)"
    if file_type == "directory":
        return f"if that directory is empty, `rmdir {quoted}`; otherwise {move}"
    return move


def _unusable(d: Diagnosis, *, held: bool = False) -> str:
    kind, path = d.lock_file_type, d.path
    if kind == "symlink":
        what = (
            "lock files are never followed through a symlink, so every acquire of "
            f"{path} raises LockIOError. If you meant the lock it points to, diagnose that "
            f"path instead, or {_move_aside(path, kind)}"
        )
    elif kind == "device":
        # A device node is the system's (/dev/null, say): moving it would
        # break far more than a lock. The lock belongs somewhere else.
        what = (
            f"every acquire of {path} raises LockIOError, and always will: leave the device "
            "alone and give the lock a path of its own (a regular file, created by the lock)"
        )
    else:
        what = (
            f"every acquire of {path} raises LockIOError until it is gone: "
            f"{_move_aside(path, kind)}, and the next acquire creates the lock file"
        )
    if held:
        return f"Even once it is free, grex_locks cannot use {path}: {what}."
    return (
        f"{path} is not usable as a lock file: {d.note or f'a {kind} sits at its path'}. "
        f"No process holds it, but {what}."
    )


# -- the states -------------------------------------------------------------------------


def _free(d: Diagnosis) -> str:
    text = f"{d.path} is free{_note(d)}: no process holds it; an acquire succeeds at once."
    if d.record_file_type:
        text += f" Note that {_record_obstacle(d)}"
    return text


def _record_obstacle(d: Diagnosis) -> str:
    """What a directory, symlink or FIFO at a free lock's record path means, and its fix."""
    record, kind = _record(d), d.record_file_type
    if kind == "directory":
        return (
            f"its owner record path {record} is a directory, not a record: an acquire still "
            "takes the lock, but its holder cannot record itself there, so diagnostics will "
            "show it as an unknown holder. `grex-locks doctor --prune` leaves it alone (it "
            f"removes only regular-file records): remove it with `rmdir {_q(record)}` (once it "
            "is empty)."
        )
    unlink = f"`rm {_q(record)}` removes the {kind} itself" + (
        ", not what it points to" if kind == "symlink" else ""
    )
    return (
        f"a {kind} sits at its owner record path {record}, not a record. It is harmless: "
        "the next holder replaces it with its own record, never writing through it. "
        "`grex-locks doctor --prune` leaves it alone (it removes only regular-file "
        f"records); to clear it now, {unlink}."
    )


def _stale(d: Diagnosis) -> str:
    if d.record_file_type:
        return f"{d.path} is free, but {_record_obstacle(d)}"
    pid, problem, record = d.recorded("pid"), d.record_problem, _record(d)
    if problem and not is_content_problem(problem):
        return (
            f"{d.path} is free, but its owner record {record} cannot be read ({problem}), "
            "so what is in it cannot be told from here: it may be another user's record, "
            "blanked at a clean release, or one left by a holder that ended without "
            "releasing the lock. It is harmless to the lock. `grex-locks doctor --prune`, "
            "run by a user who may read it, removes it if it is a stale record."
        )
    if problem:
        return (
            f"{d.path} is free, but the file at its owner record path {record} is not an "
            f"owner record ({problem}): a file written by something other than grex_locks, "
            "or a record cut short. It is harmless to the lock: the next holder replaces "
            "it. `grex-locks doctor --prune` leaves it alone, as it may not be grex_locks' "
            f"file: if it is a record, remove it with `rm {_q(record)}`."
        )
    return (
        f"{d.path} is free, but its owner record names pid {pid}, which does not hold it: "
        "it was left by a holder that ended without releasing the lock (most likely "
        "killed), or written by a tool outside grex_locks. It is harmless: the next "
        "holder replaces it, and `grex-locks doctor --prune` removes it."
    )


def _held(d: Diagnosis) -> str:
    text = f"{d.path} is {d.holder_summary()}."
    pids = [h.pid for h in d.holders] or [d.recorded("pid")]
    stopped = any(h.stopped for h in d.holders)
    if d.shared:
        return (
            f"{text} Readers write no owner record. A writer (or any exclusive acquire) "
            "waits until every reader has let go, and is granted the lock the moment the "
            "last one does."
        )
    if d.kind == WORKSPACE_SYNC:
        return (
            f"{text} A workspace sync lock never waits: while pid {pids[0]} runs this sync, a "
            "second sync on the same workspace fails at once (WorkspaceBusy) instead of "
            f"queueing. Let the first finish (or stop pid {pids[0]} if it should not be "
            "running), then start yours."
        )
    if stopped or _parent(d):
        return text  # the stopped-holder (or parent) sentence says what a wait does
    return (
        f"{text} The holder is alive, so waiting is safe: the lock is granted the moment it "
        "is released. If it seems stuck, look at what that process is doing (its logs, or "
        f"`py-spy dump --pid {shlex.quote(str(pids[0]))}`)."
    )


def _orphaned(d: Diagnosis) -> str:
    return (
        f"{d.path} is {d.holder_summary()}{_note(d)}. The lock lives on in the processes "
        "that inherited its descriptor and is released when they exit; stop them if they "
        "should not be running."
    )


def _unknown(d: Diagnosis) -> str:
    record, kind = _record(d), d.record_file_type
    start = f"{d.path} is {d.holder_summary()}"
    if kind == "directory":
        return (
            f"{start}: its owner record path {record} is a directory, so holders cannot "
            "record themselves (an acquire still takes the lock, without a record). Remove "
            f"it with `rmdir {_q(record)}` once it is empty; `grex-locks doctor --prune` leaves "
            "it alone. Waiting is safe while the holder runs."
        )
    if kind:
        return (
            f"{start}: a {kind} sits at its owner record path {record}, not a record. A "
            "grex_locks holder replaces it with its own record, so this holder is a tool "
            f"outside grex_locks (such as flock(1)) or could not write in {record.parent}. "
            "Waiting is safe while it runs; check what that process is doing."
        )
    strangers = sorted({h.username for h in d.holders if h.username} - {d.record_user})
    if d.record_user and strangers:
        return (
            f"{start}{_note(d)}. Its owner record {record} belongs to user {d.record_user}, "
            f"and the holder runs as {', '.join(strangers)}: a grex_locks holder cannot "
            "overwrite or replace another user's record file unless it is writable to it, "
            "so it takes the lock without a record (and logs so). Ask "
            f"{d.record_user} (or root) to remove {record}, or to make it writable to the "
            "users who share this directory. Waiting is safe while the holder runs."
        )
    if d.record_host:
        start += (
            f"{_note(d)}. The holder runs on this host, so the record, written on "
            f"{d.record_host}, does not describe it: it is"
        )
    else:
        start += f"{_note(d)}:"
    return (
        f"{start} a tool outside grex_locks (such as flock(1)), or a holder that "
        "has not recorded itself yet or could not (see the log of the program that took "
        "it). Waiting is safe while it runs; check what that process is doing."
    )


def _remote(d: Diagnosis) -> str:
    return (
        f"{d.path} is {d.holder_summary()}: the record names another host, so whether that "
        f"process still runs cannot be checked here. Check on {d.recorded('hostname')} "
        "(`grex-locks who` there); the record is never judged stale from here."
    )


_STATES = {
    HolderState.FREE: _free,
    HolderState.STALE_RECORD: _stale,
    HolderState.HELD: _held,
    HolderState.ORPHANED: _orphaned,
    HolderState.UNKNOWN_HOLDER: _unknown,
    HolderState.REMOTE: _remote,
}


# -- who the holders are ----------------------------------------------------------------


def _stopped(holder: Holder, d: Diagnosis, *, told: bool = False) -> str:
    """The sentences about a stopped holder; ``told``: ``kill -CONT PID`` was already given."""
    pid = holder.pid
    if holder.status == "tracing-stop":
        how = "it is stopped under a debugger or tracer (continue it there)"
    else:
        how = "it was sent SIGSTOP, or suspended with Ctrl-Z in its shell"
    effect = (
        "the workspace stays busy until then"
        if d.kind == WORKSPACE_SYNC
        else "a wait for the lock lasts until then"
    )
    text = (
        f"The holder, pid {pid}, is stopped ({how}): it cannot release the lock until it is "
        f"continued, so {effect} (or until it ends)."
    )
    if not told:
        text += f" `kill -CONT {pid}` continues it."
    if holder.ppid > 0:
        parent = f"pid {holder.ppid}" + (f" ({holder.parent})" if holder.parent else "")
        text += (
            f" Whoever stopped it is usually its parent, {parent}, or the shell it runs in "
            f"(`jobs` and `fg` there); `ps -o pid,ppid,stat,cmd -p {pid},{holder.ppid}` shows "
            "both."
        )
    return text


def _parent(d: Diagnosis) -> str:
    parent = d.observer[1]
    pids = {h.pid for h in d.holders}
    recorded = d.recorded("pid")
    if d.state is HolderState.HELD and isinstance(recorded, int):
        pids.add(recorded)
    if parent not in pids or d.state not in (HolderState.HELD, HolderState.ORPHANED):
        return ""
    return (
        f"Pid {parent} is {d.relation(parent)}: if it waits for its child to finish, as "
        "`grex-locks run` waits for its command, a wait for the lock in the child never "
        "ends. A command run under `grex-locks run PACK` already runs under PACK's lock (it "
        "inherited it) and need not take it again."
    )
