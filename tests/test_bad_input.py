"""Programming errors and impossible paths fail at the call, saying what was wrong.

- A lock whose directory is a regular file is a ``LockIOError`` that says
  so, with the ``OSError`` as its cause; ``grex-locks run FILE`` exits 2
  with the same sentence.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import (
    CLI,
    DEADLINE,
)

from grex_locks import (
    BackendLock,
    LockIOError,
    ManifestLock,
    PackLock,
    Scheduler,
    WorkspaceLock,
)

# -- a lock whose directory is not a directory ---------------------------------------------------


def _regular_file(tmp_path: Path) -> Path:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    return afile


MAKERS: dict[str, Callable[[Path], object]] = {
    "PackLock": PackLock,
    "PackLock below": lambda f: PackLock(f / "sub"),
    "WorkspaceLock": WorkspaceLock,
    "BackendLock": lambda f: BackendLock(f / "dest"),
    "ManifestLock": lambda f: ManifestLock(f / "m.lock"),
    "ManifestLock below": lambda f: ManifestLock(f / "deeper" / "m.lock"),
    "Scheduler": lambda f: Scheduler(2, slots_dir=f),
    "Scheduler below": lambda f: Scheduler(2, slots_dir=f / "slots"),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_a_regular_file_where_the_directory_should_be(
    tmp_path: Path, make: Callable[[Path], object]
) -> None:
    afile = _regular_file(tmp_path)
    with pytest.raises(LockIOError) as caught:
        make(afile)
    text = str(caught.value)
    assert f"{afile} is a regular file, not a directory" in text, text
    assert "File exists" not in text
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.path is not None
    assert str(caught.value.path).startswith(str(afile))
    assert afile.read_text() == "not a directory\n"


def test_a_dangling_symlink_where_the_directory_should_be(tmp_path: Path) -> None:
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(LockIOError) as caught:
        PackLock(link)
    assert f"{link} is a symlink to nothing, not a directory" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


def test_run_on_a_regular_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    afile = _regular_file(tmp_path)
    done = subprocess.run(
        [*CLI, "run", str(afile), "--", "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 2, done
    assert f"{afile} is a regular file, not a directory" in done.stderr
    assert "File exists" not in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
