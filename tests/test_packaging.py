"""grex_locks as a user gets it: the sdist and wheel build, and the wheel works in a fresh venv.

The wheel is installed (not editable) into a new virtual environment, whose
dependencies come from the package index, and used from outside the source
tree: ``import grex_locks`` must come from that venv's site-packages, the
``grex-locks`` console script must run, and so must ``scripts/demo.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from grex_locks import __version__

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        importlib.util.find_spec("build") is None,
        reason="the 'build' package is not installed (pip install -e '.[test]' brings it)",
    ),
]


def _run(argv: list[str | Path], cwd: Path) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SECONDS,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from a copy of the source tree (the wheel from the sdist).

    ``GREX_LOCKS_DIST_DIR`` names a directory where they were just built from
    this tree (``.ci/run`` builds them in its package stage): they are taken
    from there rather than built twice.
    """
    prebuilt = os.environ.get("GREX_LOCKS_DIST_DIR")
    if prebuilt:
        return Path(prebuilt)
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    # A copy without the build leftovers and virtual environments of the work tree.
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", ".tox", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    _run([sys.executable, "-m", "build", "--outdir", tmp / "out", source], cwd=tmp)
    return tmp / "out"


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def test_the_sdist_and_the_wheel_carry_the_version_and_the_whole_package(dist: Path) -> None:
    sdist = _one(dist, f"grex_locks-{__version__}.tar.gz")
    wheel = _one(dist, f"grex_locks-{__version__}-py3-none-any.whl")
    packages = sorted(
        str(init.parent.relative_to(ROOT)) for init in (ROOT / "grex_locks").rglob("__init__.py")
    )
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    assert "grex_locks/py.typed" in names
    with tarfile.open(sdist) as tar:
        members = {
            Path(m).relative_to(f"grex_locks-{__version__}").as_posix() for m in tar.getnames()[1:]
        }
    assert {"pyproject.toml", "README.md", "grex_locks/_version.py"} <= members


def test_twine_check_passes(dist: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (pip install -e '.[package]' brings it)")
    _run(
        [sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())], cwd=tmp_path
    )


def test_the_wheel_works_in_a_fresh_venv_outside_the_source_tree(
    dist: Path, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    python, console = env_dir / "bin" / "python", env_dir / "bin" / "grex-locks"
    # This interpreter's pip installs into the new venv (pip >= 22.3 has
    # --python): seeding the venv with its own pip would take longer than the rest.
    outer_pip = tuple(int(part) for part in version("pip").split(".")[:2])
    if outer_pip >= (22, 3):
        venv.create(env_dir, with_pip=False)
        pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python]
    else:
        venv.create(env_dir, with_pip=True)
        pip = [python, "-m", "pip"]
    _run([*pip, "install", "-q", "--disable-pip-version-check", _one(dist, "*.whl")], cwd=tmp_path)
    where = tmp_path / "elsewhere"
    where.mkdir()

    shown = _run(
        [
            python,
            "-c",
            "import grex_locks; print(grex_locks.__version__); print(grex_locks.__file__)",
        ],
        cwd=where,
    ).split()
    assert shown[0] == __version__
    assert Path(shown[1]).is_relative_to(env_dir), f"grex_locks imported from {shown[1]}"

    assert "who" in _run([console, "--help"], cwd=where)
    # `--version` (issue 12) is expected of every release; check it once the CLI offers it.
    if "--version" in _run([console, "--help"], cwd=where):
        assert _run([console, "--version"], cwd=where).split()[-1] == __version__

    demo = where / "demo.py"
    shutil.copy(ROOT / "scripts" / "demo.py", demo)
    output = _run([python, demo], cwd=where)
    assert re.search(r"demo passed", output), output
