"""Who is related to whom among processes, and exactly when each started, from Linux ``/proc``.

A flock belongs to an open file description, which processes share by
inheriting it across ``fork``: the processes that hold a lock besides the
one that took it are, but for a descriptor deliberately passed over a socket,
its descendants (``flock -c``'s command, ``grex-locks run``'s CMD) or the
ancestor that opened the file for it (a shell's ``exec 9>lock; flock 9``).
Asking the taker's family costs a few reads; asking every process on a busy
machine costs tens of milliseconds, more than an error message may spend.

Nothing here raises: a process that vanished or may not be looked at reads
as "nothing known".
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` diagnostics use: the parent, and the start in ticks."""

    ppid: int
    start_ticks: int


def proc_stat(pid: int, proc: str = "/proc") -> ProcStat | None:
    """``pid``'s parent and start (clock ticks after boot, field 22); ``None`` if unreadable."""
    if pid <= 0:
        return None
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat_file:
            text = stat_file.read()
        # The command name (field 2) may hold spaces and parentheses: the
        # fields that follow start after its last ")".
        fields = text.rpartition(b")")[2].split()
        return ProcStat(ppid=int(fields[1]), start_ticks=int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int, proc: str = "/proc") -> list[int]:
    """The live children of ``pid``, of all its threads; ``[]`` if unknown.

    A child is listed under the thread that forked it, so every thread's
    ``children`` file is read.
    """
    if pid <= 0:
        return []
    children: list[int] = []
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children", "rb") as listing:
                children.extend(int(word) for word in listing.read().split())
        except (OSError, ValueError):
            continue
    return list(dict.fromkeys(children))
