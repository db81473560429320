"""What a forked child does with the locks it inherited: nothing held, nothing unlocked.

A child forked while its parent holds a lock (a ``fork`` pool worker, say)
must neither hold nor be able to release that lock. flock belongs to the
open file description, which the child shares with its parent: unlocking
from the child would free the parent's lock, and keeping the descriptor
would pin the lock after the parent dies. So the child *closes* every
inherited lock descriptor without unlocking, forgets every hold, gate and
tier, and lets its lock objects reopen their files on first use.
"""

from __future__ import annotations

import os

from grex_locks import scheduler

from . import gate, kernel_wait, primitive, slow_waits, tiers
from . import lock_file as lockfile

_after_fork_hooks: list[object] = []


def _after_fork_in_child() -> None:
    lockfile.close_all_inherited()
    gate.reset_after_fork()
    tiers.reset_after_fork()
    primitive.forget_all_after_fork()
    scheduler.reset_all_after_fork()
    slow_waits.reset_after_fork()
    kernel_wait.reset_after_fork()


def install() -> None:
    """Register the child-side reset once per process (idempotent)."""
    if not _after_fork_hooks:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _after_fork_hooks.append(_after_fork_in_child)
