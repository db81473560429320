"""Which files are grex locks, and what kind of lock each is, by name (or by its record).

Diagnostics cannot ask a lock object what it is: they see files. A file is a
grex lock by its name (``.grex-lock``, ``.grex.sync.lock``, ``.grex.lock``,
``<dest>.grex-backend.lock``, a scheduler's ``slot-<n>.lock``) or by having an
owner record beside it; its kind comes from the name, else from the tier its
record names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PACK_LOCK = ".grex-lock"
SYNC_LOCK = ".grex.sync.lock"
MANIFEST_LOCK = ".grex.lock"
BACKEND_SUFFIX = ".grex-backend.lock"
#: File names that are grex locks wherever they appear.
LOCK_FILE_NAMES = frozenset({PACK_LOCK, SYNC_LOCK, MANIFEST_LOCK})
_SLOT = re.compile(r"slot-\d{1,9}\.lock", re.ASCII)

WORKSPACE_SYNC = "workspace sync lock"
SCHEDULER_SLOT = "scheduler slot"
PACK = "pack lock"
BACKEND = "backend lock"
MANIFEST = "manifest lock"
_BY_NAME = {PACK_LOCK: PACK, SYNC_LOCK: WORKSPACE_SYNC, MANIFEST_LOCK: MANIFEST}
#: Kinds by the tier a record names (``Tier`` values).
_BY_TIER = {0: WORKSPACE_SYNC, 1: SCHEDULER_SLOT, 2: PACK, 3: BACKEND, 4: MANIFEST}


def is_slot_name(name: str) -> bool:
    """Whether ``name`` is a scheduler slot file's: ``slot-<n>.lock``."""
    return _SLOT.fullmatch(name) is not None


def is_lock_name(name: str) -> bool:
    """Whether a file called ``name`` is a grex lock by its name alone."""
    return (
        name in LOCK_FILE_NAMES
        or (name.endswith(BACKEND_SUFFIX) and name != BACKEND_SUFFIX)
        or is_slot_name(name)
    )


def lock_kind(path: Path, owner: dict[str, Any] | None = None) -> str:
    """What kind of grex lock ``path`` is: by its name, else by its record's tier, else "lock"."""
    name = path.name
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.endswith(BACKEND_SUFFIX) and name != BACKEND_SUFFIX:
        return BACKEND
    if is_slot_name(name):
        return SCHEDULER_SLOT
    tier = owner.get("tier") if isinstance(owner, dict) else None
    if isinstance(tier, int) and not isinstance(tier, bool) and tier in _BY_TIER:
        return _BY_TIER[tier]
    return "lock"
