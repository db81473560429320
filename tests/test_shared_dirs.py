"""Shared workspaces: any user who may take a lock takes it, whatever another user left there.

Real second users: the test runs as root and starts *user servers* — this
file's upper part run in a fresh interpreter under ``setpriv --reuid
--regid --clear-groups`` as ``nobody`` (uid 65534) and as a second
unprivileged uid — which take and release locks when told. The test (root)
reads every record's bytes itself and asks the kernel, through util-linux
``flock -n`` on a descriptor opened without ``O_CREAT``, whether a lock is
busy.

Workspaces are sticky (``1777``) or group-shared (``2775``, setgid, owned by
a shared gid that the unprivileged users get as their real gid). The record
is information, never authority: where a record cannot be placed (a
stranger's read-only record in a sticky directory, a directory at the record
path) the lock must still be taken, and nothing at the record path is ever
written through (symlinks, hard links, FIFOs).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import BUSY, DEADLINE, FLOCK, Json, flock_n, owner_record, record_file

import grex_locks
from grex_locks import ManifestLock, PackLock

PYTHON = sys.executable
SETPRIV = shutil.which("setpriv")


def user_server() -> None:
    """Run as some user: take, release and plant things when told (JSON lines on stdin)."""
    holds: dict[str, Any] = {}
    for line in sys.stdin:
        command: Json = json.loads(line)
        reply: Json = {"ok": True, "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        try:
            op, path = command["op"], command.get("path", "")
            if op == "take":
                if command["kind"] == "pack":
                    holds[path] = PackLock(path).acquire(timeout=DEADLINE)
                else:
                    holds[path] = ManifestLock(path).write(timeout=DEADLINE)
            elif op == "permit":
                holds[path] = grex_locks.Scheduler(2, slots_dir=path).acquire(timeout=DEADLINE)
            elif op == "release":
                holds.pop(path).release()
            elif op == "umask":
                os.umask(command["mask"])
            elif op == "symlink":
                os.symlink(command["target"], path)
            elif op == "link":
                os.link(command["target"], path)
            elif op == "write":
                with open(path, "xb") as new:
                    new.write(command["data"].encode())
            elif op != "ping":
                raise ValueError(f"unknown op {op!r}")
        except Exception:  # noqa: BLE001 - the test reads it
            reply = {"ok": False, "error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


# == helper processes run this file up to here: no pytest above this line ==

import pytest  # noqa: E402 - below the part that user servers run

#: Runs the part of this file above the marker as a user server (``entry()``), with this
#: file's directory on ``sys.path`` for ``support``.
_MARKER = "# == helper processes run this file up to here"
_BOOT = (
    "import os, sys; path = sys.argv[1]; sys.path.insert(0, os.path.dirname(path)); "
    "source = open(path).read().split({marker!r})[0]; "
    "namespace = {{'__name__': '_shared_dirs_helper'}}; "
    "exec(compile(source, path, 'exec'), namespace); namespace[{entry!r}]()"
)
THIS_FILE = str(Path(__file__).resolve())
GREX_LOCKS = str(Path(PYTHON).with_name("grex-locks"))

NOBODY_UID = 65534
OTHER_UID = 4243  # a second unprivileged user; needs no passwd entry
SHARED_GID = 4242  # the group a group-shared workspace belongs to

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as other users"),
    pytest.mark.skipif(SETPRIV is None, reason="util-linux setpriv is not installed"),
    pytest.mark.skipif(FLOCK is None, reason="util-linux flock is not installed"),
    pytest.mark.timeout(120),
]


def as_user(uid: int, gid: int, argv: list[str]) -> list[str]:
    """``argv`` run as ``uid``/``gid`` with no supplementary groups (as is, for root)."""
    if uid == 0:
        return argv
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _readline(stream: Any, timeout: float, what: str) -> str:
    readable, _, _ = select.select([stream], [], [], timeout)
    assert readable, f"{what}: nothing within {timeout} s"
    line: str = stream.readline()
    return line


class UserServer:
    """A :func:`user_server` process running as one user."""

    def __init__(self, name: str, uid: int, gid: int, cwd: Path) -> None:
        self.name, self.uid, self.gid = name, uid, gid
        argv = [PYTHON, "-c", _BOOT.format(marker=_MARKER, entry="user_server"), THIS_FILE]
        self.process = subprocess.Popen(
            as_user(uid, gid, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=_env(),
        )
        self.pid = self.process.pid
        hello = self.ask({"op": "ping"})
        assert (hello["uid"], hello["gid"]) == (uid, gid), hello

    def ask(self, command: Json) -> Json:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = _readline(self.process.stdout, DEADLINE, f"{self.name} answering {command}")
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(f"{self.name} died: {self.process.stderr.read()}")
        reply: Json = json.loads(line)
        return reply

    def do(self, command: Json) -> Json:
        reply = self.ask(command)
        assert reply["ok"], f"{self.name} (uid {self.uid}) could not {command}:\n{reply['error']}"
        return reply

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        try:
            self.process.wait(DEADLINE)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(DEADLINE)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A directory every test user can reach (pytest's own tmp directories are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="grex-shared-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def users(base: Path) -> Iterator[dict[str, UserServer]]:
    """Long-lived servers: root, nobody and a second unprivileged user (both in SHARED_GID)."""
    servers = {
        "root": UserServer("root", 0, 0, base),
        "nobody": UserServer("nobody", NOBODY_UID, SHARED_GID, base),
        "other": UserServer("other", OTHER_UID, SHARED_GID, base),
    }
    yield servers
    for server in servers.values():
        server.close()


_counter = iter(range(1_000_000))


def shared_dir(parent: Path, sharing: str) -> Path:
    """A fresh directory: ``sticky`` (1777, root's) or ``group`` (2775, group SHARED_GID)."""
    path = parent / f"{sharing}-{next(_counter)}"
    path.mkdir()
    if sharing == "sticky":
        path.chmod(0o1777)
    else:
        os.chown(path, 0, SHARED_GID)
        path.chmod(0o2775)
    return path


def lock_file_of(kind: str, workspace: Path) -> tuple[str, Path]:
    """(the path to give the lock, its lock file) for a pack or the workspace's manifest lock."""
    if kind == "manifest":
        path = workspace / grex_locks.MANIFEST_LOCK_FILE_NAME
        return str(path), path
    # The pack directory is shared the same way as the workspace it sits in.
    pack = workspace / "pack"
    if not pack.exists():
        pack.mkdir()
        st = os.stat(workspace)
        os.chown(pack, 0, st.st_gid)
        pack.chmod(st.st_mode & 0o7777)
    return str(pack), pack / grex_locks.PACK_LOCK_FILE_NAME


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def assert_held_by(lock_file: Path, pid: int, uid: int, *, record_required: bool = True) -> None:
    """A third process finds the lock busy, and the record (if any) names ``pid`` of ``uid``."""
    assert flock_n(lock_file) == BUSY, f"{lock_file} is free while pid {pid} holds it"
    record = owner_record(lock_file)
    if record is None:
        assert not record_required, f"{lock_file}: no record while pid {pid} (uid {uid}) holds it"
        return
    assert record["pid"] == pid, f"the record names {record['pid']}, the holder is {pid}"
    assert uid_of(record["pid"]) == uid


def assert_free(lock_file: Path) -> None:
    assert flock_n(lock_file) == 0, f"{lock_file} is still busy"
    assert owner_record(lock_file) is None, f"a record is left: {owner_record(lock_file)}"


def hold_and_check(server: UserServer, kind: str, target: str, lock_file: Path) -> None:
    """``server``'s user takes the lock (must succeed), is named by the record, releases it."""
    server.do({"op": "take", "kind": kind, "path": target})
    try:
        assert_held_by(lock_file, server.pid, server.uid)
    finally:
        server.do({"op": "release", "path": target})
    assert_free(lock_file)


def run_and_check(uid: int, gid: int, pack: str, lock_file: Path) -> None:
    """``grex-locks run PACK -- CMD`` as ``uid``: CMD runs under the lock; exit 0."""
    command = [GREX_LOCKS, "run", pack, "--", "sh", "-c", "echo held; read line"]
    process = subprocess.Popen(
        as_user(uid, gid, command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        line = _readline(process.stdout, DEADLINE, "grex-locks run")
        assert line == "held\n", f"grex-locks run as uid {uid}: {line!r}"
        # setpriv execs grex-locks: the Popen pid is the process that holds the lock.
        assert_held_by(lock_file, process.pid, uid)
        _, err = process.communicate("\n", timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=DEADLINE)
    assert process.returncode == 0, (
        f"grex-locks run as uid {uid} exited {process.returncode}: {err}"
    )
    assert_free(lock_file)


# -- one user after another -----------------------------------------------------------------

ORDERS = {
    "root-then-nobody": ("root", "nobody"),
    "nobody-then-root": ("nobody", "root"),
    "other-then-nobody": ("other", "nobody"),
}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("kind", ["pack", "manifest", "run"])
@pytest.mark.parametrize("sharing", ["sticky", "group"])
def test_each_user_takes_the_lock_after_another_user(
    base: Path, users: dict[str, UserServer], sharing: str, kind: str, order: str
) -> None:
    workspace = shared_dir(base, sharing)
    target, lock_file = lock_file_of("pack" if kind == "run" else kind, workspace)
    for name in ORDERS[order]:
        server = users[name]
        if kind == "run":
            run_and_check(server.uid, server.gid, target, lock_file)
        else:
            hold_and_check(server, kind, target, lock_file)
    # Whoever left it, the record file is still a plain file at its path.
    assert record_file(lock_file).is_file()


@pytest.mark.parametrize("kind", ["pack", "manifest", "slots"])
@pytest.mark.parametrize("sharing", ["sticky", "group"])
def test_a_creator_with_umask_077_does_not_lock_other_users_out(
    base: Path, users: dict[str, UserServer], sharing: str, kind: str
) -> None:
    # The first user to take a lock creates its file; with umask 077 it would
    # be theirs alone (0600), and nobody else could even open it to lock.
    workspace = shared_dir(base, sharing)
    creator, other = users["nobody"], users["other"]
    creator.do({"op": "umask", "mask": 0o077})
    try:
        if kind == "slots":
            slots = workspace / "slots"
            slots.mkdir()
            os.chown(slots, 0, os.stat(workspace).st_gid)
            slots.chmod(os.stat(workspace).st_mode & 0o7777)
            for server in (creator, other):
                server.do({"op": "permit", "path": str(slots)})
                server.do({"op": "release", "path": str(slots)})
            return
        target, lock_file = lock_file_of(kind, workspace)
        hold_and_check(creator, kind, target, lock_file)
        hold_and_check(other, kind, target, lock_file)
    finally:
        creator.do({"op": "umask", "mask": 0o022})


@pytest.mark.parametrize("kind", ["pack", "slots"])
@pytest.mark.parametrize("umask", [0o077, 0o022], ids=["umask077", "umask022"])
@pytest.mark.parametrize("sharing", ["sticky", "group"])
def test_directories_a_lock_creates_are_as_open_as_their_parent(
    base: Path, users: dict[str, UserServer], sharing: str, umask: int, kind: str
) -> None:
    # Found by a trial: the lock file was readable by all, but the missing
    # directories made on the way followed the creator's umask: with 077 no
    # other user could reach the lock file; with 022 in a 2775 group
    # workspace the others could lock but never record themselves.
    workspace = shared_dir(base, sharing)
    creator, other = users["nobody"], users["other"]
    made = workspace / "packs" / "deep"
    target = made / ("slots" if kind == "slots" else "pack")
    creator.do({"op": "umask", "mask": umask})
    try:
        if kind == "slots":
            for server in (creator, other):
                server.do({"op": "permit", "path": str(target)})
                server.do({"op": "release", "path": str(target)})
        else:
            lock_file = target / grex_locks.PACK_LOCK_FILE_NAME
            hold_and_check(creator, kind, str(target), lock_file)
            hold_and_check(other, kind, str(target), lock_file)
    finally:
        creator.do({"op": "umask", "mask": 0o022})
    expected = os.stat(workspace).st_mode & 0o7777
    for directory in (workspace / "packs", made, target):
        assert os.stat(directory).st_mode & 0o7777 == expected, directory


# -- what may sit at the record path --------------------------------------------------------


def _legacy_record(path: Path, blank: bool) -> bytes:
    """A root-owned 0644 record, written by hand: valid JSON, then (if ``blank``) spaces."""
    text = json.dumps(
        {
            "pid": 999_999,
            "create_time": 1.0,
            "hostname": "elsewhere",
            "thread": "MainThread",
            "tier": 2,
            "acquired_at": 1.0,
            "argv": ["grex"],
        }
    ).encode()
    path.write_bytes(text)
    if blank:
        path.write_bytes(b" " * len(text))
    path.chmod(0o644)
    os.chown(path, 0, 0)
    return path.read_bytes()


@pytest.mark.parametrize("blank", [True, False], ids=["blanked", "stale"])
@pytest.mark.parametrize("sharing", ["sticky", "group"])
def test_a_root_owned_read_only_record_never_locks_another_user_out(
    base: Path, users: dict[str, UserServer], sharing: str, blank: bool
) -> None:
    workspace = shared_dir(base, sharing)
    target, lock_file = lock_file_of("pack", workspace)
    PackLock(target)  # the lock file, root's, as a first holder would leave it
    legacy = _legacy_record(record_file(lock_file), blank)
    nobody = users["nobody"]
    nobody.do({"op": "take", "kind": "pack", "path": target})
    try:
        # Taken without a record is acceptable (the record is information); a record
        # that names anyone must name the holder.
        record = owner_record(lock_file)
        stale = record is not None and record["pid"] == 999_999
        assert flock_n(lock_file) == BUSY
        if not stale:
            assert_held_by(lock_file, nobody.pid, NOBODY_UID, record_required=False)
    finally:
        nobody.do({"op": "release", "path": target})
    assert flock_n(lock_file) == 0
    if stale:
        assert record_file(lock_file).read_bytes() == legacy, "root's record changed in place"


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_directory_at_the_record_path_is_left_alone(
    base: Path, users: dict[str, UserServer], who: str
) -> None:
    workspace = shared_dir(base, "sticky")
    target, lock_file = lock_file_of("pack", workspace)
    directory = record_file(lock_file)
    directory.mkdir()
    (directory / "keep").write_bytes(b"keep me\n")
    before = os.stat(directory)
    server = users[who]
    server.do({"op": "take", "kind": "pack", "path": target})
    try:
        assert_held_by(lock_file, server.pid, server.uid, record_required=False)
    finally:
        server.do({"op": "release", "path": target})
    assert flock_n(lock_file) == 0
    after = os.stat(directory, follow_symlinks=False)
    assert directory.is_dir()
    assert not directory.is_symlink()
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, 0)
    assert sorted(p.name for p in directory.iterdir()) == ["keep"]
    assert (directory / "keep").read_bytes() == b"keep me\n"


SYMLINK_CASES = {
    # planted by, taken by, target exists
    "nobody-plants-root-takes": ("nobody", "root", True),
    "root-plants-nobody-takes": ("root", "nobody", True),
    "nobody-plants-nobody-takes": ("nobody", "nobody", True),
    "dangling-root-takes": ("nobody", "root", False),
    "dangling-nobody-takes": ("root", "nobody", False),
}


@pytest.mark.parametrize("case", list(SYMLINK_CASES))
def test_a_symlink_at_the_record_path_is_never_written_through(
    base: Path, users: dict[str, UserServer], case: str
) -> None:
    planter_name, taker_name, exists = SYMLINK_CASES[case]
    planter, taker = users[planter_name], users[taker_name]
    outside = shared_dir(base, "sticky")
    victim = outside / "victim"
    content = b"the taker's own file, which must never change\n"
    if exists:
        victim.write_bytes(content)
        os.chown(victim, taker.uid, taker.gid)  # writable by the taker: only a follow would hurt
    workspace = shared_dir(base, "sticky")
    target, lock_file = lock_file_of("pack", workspace)
    planter.do({"op": "symlink", "path": str(record_file(lock_file)), "target": str(victim)})

    def victim_intact() -> None:
        if exists:
            assert victim.read_bytes() == content, "written through the symlink"
        else:
            assert not victim.exists(), "the symlink's dangling target was created"

    taker.do({"op": "take", "kind": "pack", "path": target})
    try:
        victim_intact()
        assert_held_by(lock_file, taker.pid, taker.uid, record_required=False)
    finally:
        taker.do({"op": "release", "path": target})
    victim_intact()
    assert flock_n(lock_file) == 0
    record = record_file(lock_file)
    if record.is_symlink():
        assert os.readlink(record) == str(victim), "the symlink was changed, not replaced"
    else:
        assert record.is_file(), "neither the symlink nor a record file is at the record path"


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_hard_link_at_the_record_path_never_changes_the_linked_file(
    base: Path, users: dict[str, UserServer], who: str
) -> None:
    server = users[who]
    workspace = shared_dir(base, "sticky")
    target, lock_file = lock_file_of("pack", workspace)
    mine = workspace / "mine"
    content = b"another file of the same user\n"
    server.do({"op": "write", "path": str(mine), "data": content.decode()})
    server.do({"op": "link", "path": str(record_file(lock_file)), "target": str(mine)})
    assert os.stat(mine).st_nlink == 2
    server.do({"op": "take", "kind": "pack", "path": target})
    try:
        assert mine.read_bytes() == content, "the record was written into a hard-linked file"
        assert_held_by(lock_file, server.pid, server.uid, record_required=False)
    finally:
        server.do({"op": "release", "path": target})
    assert mine.read_bytes() == content, "the record was written into a hard-linked file"
    assert flock_n(lock_file) == 0


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_fifo_at_the_record_path_neither_hangs_nor_locks_out(
    base: Path, users: dict[str, UserServer], who: str
) -> None:
    workspace = shared_dir(base, "sticky")
    target, lock_file = lock_file_of("pack", workspace)
    os.mkfifo(record_file(lock_file), 0o666)
    server = users[who]
    started = time.monotonic()
    server.do({"op": "take", "kind": "pack", "path": target})
    try:
        assert time.monotonic() - started < DEADLINE
        assert_held_by(lock_file, server.pid, server.uid, record_required=False)
    finally:
        server.do({"op": "release", "path": target})
    assert flock_n(lock_file) == 0
