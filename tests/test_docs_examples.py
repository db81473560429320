"""Every code block in README.md and docs/ runs, so the examples stay true.

What a fenced block's language means here:

- ``python``: run as a script by this interpreter;
- ``sh``: run by ``bash -eu -o pipefail`` (a command that fails fails the test);
- ``json``: parsed, so it must be valid JSON;
- ``text``: output, diagrams, transcripts: never run.

Two markers, each on the line right before a block, change that:

- ``<!-- not run: REASON -->``: the block is not run (the README's install
  commands, which would install this very project);
- ``<!-- save as: NAME -->``: the block is written to the file NAME for a
  later block to run (a script that a shell example then starts).

Any other language is an error, so nothing is skipped by accident.

Each page's blocks run in order in one fresh empty directory, so a block can
set up what a later block of the same page uses, and relative paths such as
``ws/packs/a`` land there (lock constructors create missing directories).
``python`` and ``grex-locks`` on the blocks' PATH are this interpreter's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

import grex_locks

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN = {"python", "sh"}
KNOWN = RUN | {"json", "text"}
BLOCK_SECONDS = 90

_FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S
)
_MARKER = re.compile(r"<!--\s*(?P<kind>not run|save as):\s*(?P<value>\S.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    not_run: str = ""
    save_as: str = ""

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order."""
    text = page.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        kind, value = (marker["kind"], marker["value"]) if marker else ("", "")
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines())
        blocks.append(
            Block(
                page=page,
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"],
                body=body + "\n",
                not_run=value if kind == "not run" else "",
                save_as=value if kind == "save as" else "",
            )
        )
    return blocks


def _environment(tmp: Path) -> dict[str, str]:
    shims = tmp / "bin"
    shims.mkdir()
    for name in ("python", "python3"):
        # A script, not a symlink: a venv's python found through a symlink
        # elsewhere would not know it is in the venv.
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREX_LOCKS_", "PYTEST"))}
    path = [str(shims), sysconfig.get_path("scripts"), env.get("PATH", os.defpath)]
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(block: Block, work: Path, scripts: Path, env: dict[str, str], groups: list[int]) -> None:
    """Run one block in ``work``; fail the test with its output if it fails.

    The block runs in a session of its own, whose process group goes on
    ``groups``: what it leaves running on purpose (a stuck holder for a later
    block to find) is killed when the page is done.
    """
    script = scripts / f"line{block.line}.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(block.body)
    argv = [sys.executable, str(script)]
    if block.lang == "sh":
        argv = ["bash", "-eu", "-o", "pipefail", str(script)]
    output = scripts / f"line{block.line}.out"
    with output.open("w+") as out:
        # Output to a file, not a pipe: a process left running would hold a
        # pipe open, and reading it would never end.
        proc = subprocess.Popen(
            argv,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        groups.append(proc.pid)
        try:
            status: int | None = proc.wait(timeout=BLOCK_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
            _kill_groups([proc.pid])
            proc.wait()
        out.seek(0)
        printed = out.read()
    if status != 0:
        outcome = f"timed out after {BLOCK_SECONDS} s" if status is None else f"exit {status}"
        pytest.fail(f"{block.where()}: {block.lang} block failed ({outcome}):\n{printed}")


def _kill_groups(groups: list[int]) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    env = _environment(tmp_path)
    groups: list[int] = []
    try:
        for block in blocks_of(page):
            assert block.lang in KNOWN, (
                f"{block.where()}: a code block needs one of {sorted(KNOWN)} as its language, "
                f"not {block.lang!r} (see tests/test_docs_examples.py)"
            )
            if block.lang == "json":
                json.loads(block.body)
            elif block.save_as:
                (work / block.save_as).write_text(block.body)
            elif block.lang in RUN and not block.not_run:
                _run(block, work, scripts, env, groups)
    finally:
        _kill_groups(groups)


def test_the_docs_have_runnable_examples() -> None:
    # Guards the runner itself: a broken fence pattern would find nothing and pass.
    runnable = [b for page in PAGES for b in blocks_of(page) if b.lang in RUN and not b.not_run]
    runnable = [b for b in runnable if not b.save_as]
    assert len({b.page for b in runnable}) >= 5
    assert {b.lang for b in runnable} == RUN


def test_every_public_name_has_one_reference_entry() -> None:
    directives = re.findall(
        r"^::: grex_locks\.(\S+)\s*$",
        "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")),
        re.M,
    )
    assert sorted(directives) == sorted(grex_locks.__all__)


def test_readme_links_stay_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "API.md" not in readme
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme):
        assert "://" not in target, f"README links outside the repository: {target}"
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_every_diagnosis_state_is_explained() -> None:
    page = (ROOT / "docs" / "diagnostics.md").read_text()
    for state in grex_locks.HolderState:
        assert f"| `{state.name}` |" in page, f"docs/diagnostics.md does not explain {state.name}"
