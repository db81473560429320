"""Which process generation this is: how every piece of lock state knows it was inherited.

A child forked while its parent holds a lock (a ``fork`` pool worker, a
``subprocess`` with ``preexec_fn``) must neither hold nor release that lock,
nor touch its owner record. flock belongs to the open file description, which
parent and child share: an unlock from the child would free the parent's
lock, and a write to the record's descriptor would erase the parent's record.

There is no central list of things to reset. Instead, in the manner of
CPython's ``_at_fork_reinit``, each object that owns a descriptor, a mutex or
a hold notes the generation it was made in, and when it is next used in a
later generation it reinitialises itself (a lock object) or disarms itself (a
hold: its release steps are dropped, never run). Module-level state registers
its own reset with :func:`os.register_at_fork` next to its definition. So new
state cannot be forgotten by a hub that does not know about it.
"""

from __future__ import annotations

import os


class _Generation:
    """A counter bumped in every forked child, before any other reset runs."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


#: ``generation.value`` is compared by every object that must not act across a fork.
generation = _Generation()


def _bump_in_child() -> None:
    generation.value += 1


# Registered at import of the core's first module: the after-fork hooks run in
# registration order, so every later reset already sees the new generation.
os.register_at_fork(after_in_child=_bump_in_child)
