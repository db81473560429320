"""The suite's fixtures; every helper, constant and child target is in ``support.py``.

- ``kind``: each file lock kind in turn, so that one contract test body runs over all.
- ``pack``, ``slots_dir``: fresh directories for a pack lock and a scheduler.
- ``holders``: subprocess lock holders (:class:`support.Holders`), none outliving the test.
- An autouse fixture that fails any test leaving a lock queue in use or a tier
  held, and restores the tier check mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LOCK_KINDS, Holders, LockKind

import grex_locks
from grex_locks._core import fair_queue, tiers


@pytest.fixture(params=LOCK_KINDS, ids=str)
def kind(request: pytest.FixtureRequest) -> LockKind:
    """Each file lock kind in turn."""
    result: LockKind = request.param
    return result


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    """A fresh, existing pack directory."""
    path = tmp_path / "pack"
    path.mkdir()
    return path


@pytest.fixture(params=["local", "slots_dir"])
def slots_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """No slots_dir (a process-local bound), or a fresh slots directory."""
    return None if request.param == "local" else tmp_path / "slots"


@pytest.fixture
def holders() -> Iterator[Holders]:
    """Spawns holder processes; kills whatever is left of them after the test."""
    spawner = Holders()
    yield spawner
    spawner.close()


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Fail a test that leaves a lock queue in use or a held tier; restore the tier check mode.

    A leak is reset after it is reported so that it fails one test, not
    every test after it.
    """
    mode = tiers.tier_check_mode()
    yield
    grex_locks.set_tier_check(mode)
    registered = fair_queue.queues_in_use()
    held = tiers.held_tiers()
    if held:
        tiers.reset_after_fork()
    assert registered == 0, f"{registered} lock queues still in use after the test"
    assert held == (), f"tiers still held after the test: {held}"
