"""Forks in the chaos run: children of lock holders, fork pools, and inherited descriptors.

What a ``fork`` does to held locks is where ownership breaks first (see the
README's Fork section): a forked child must neither hold nor release its
parent's locks, nor write its parent's records, whatever it does. Here a
worker thread that holds a chain of locks

* forks a child (:func:`fork_child`) that does one of :data:`BEHAVIOURS` —
  collect garbage, ``os._exit``, return through every frame (leaving each
  inherited ``with``), ``sys.exit``, raise, drop the inherited holds, release
  them explicitly, take other locks (whose descriptors reuse the numbers of
  the inherited ones the library closed), try its parent's own lock, or take a
  lock and drop every reference to it — and then the parent checks, as a third
  process would, that every lock it holds is still held (a new open file
  description must not get it) and that each owner record still names it;
* runs a ``fork`` ``ProcessPoolExecutor`` under a held workspace lock or
  scheduler permit (:func:`sync_with_pool`), whose tasks take pack and
  manifest locks themselves, and checks the same afterwards;
* hands a held lock's descriptor to a child program (:func:`hand_to_inheritor`,
  ``stress_inheritor.py``), as ``grex-locks run`` does: if the worker is killed
  meanwhile, the lock lives on in the child and must be diagnosed ORPHANED.

Every child of a worker is an :class:`~stress_worker.Actor` under a name of
its own, audited like the worker, and dies with it (``PR_SET_PDEATHSIG``),
so the coordinator's ``C kill <wid>`` covers it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import multiprocessing
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from stress_audit import kernel_says_holds
from stress_worker import (
    N_BACKENDS,
    N_PACKS,
    Actor,
    Chain,
    PatienceExceeded,
    Taken,
)

from grex_locks import BackendLock, LockBusy, LockCancelled, LockTimeout, PackLock, WorkspaceBusy

#: What a child forked by a lock holder does (see the module docstring).
BEHAVIOURS = (
    "gc",
    "_exit",
    "return",
    "sys.exit",
    "raise",
    "drop",
    "release",
    "locks",
    "same",
    "forget",
)
#: How a child that did something first then ends.
ENDINGS = ("gc+_exit", "return", "sys.exit", "raise")
INHERITOR = Path(__file__).resolve().parent / "stress_inheritor.py"
_PR_SET_PDEATHSIG = 1


class ChildReturn(BaseException):
    """Unwinds a forked child's stack like a return through every frame."""


class ChildError(Exception):
    """A forked child's deliberate exception."""


#: In a forked child: (its actor, its behaviour, the exception it raised to end).
_child: tuple[Actor, str, BaseException | None] | None = None
#: In a fork pool worker: its actor.
_pool_actor: Actor | None = None
#: The descriptors that held the parent's locks when it forked (numbers a child may reuse).
_parent_fds: set[int] = set()


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (a child of a killed worker must not linger)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def probe_free(path: Path) -> bool:
    """Whether a new open file description gets the lock at once: what a third process would see."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def record_problem(path: Path, pid: int, thread: str) -> str | None:
    """What is wrong with ``path``'s owner record for a hold of ``pid``'s ``thread``; None: fine."""
    record = path.with_name(path.name + ".owner")
    try:
        data = record.read_bytes()
    except OSError as exc:
        return f"record {record} unreadable: {exc}"
    try:
        owner = json.loads(data)
    except ValueError:
        return f"record {record} is not JSON: {data[:160]!r}"
    if not isinstance(owner, dict):
        return f"record {record} is not an object: {data[:160]!r}"
    if owner.get("pid") != pid or owner.get("thread") != thread:
        return (
            f"record {record} names pid {owner.get('pid')} thread {owner.get('thread')!r}, "
            f"not pid {pid} thread {thread!r}"
        )
    return None


def check_holds(chain: Chain, when: str) -> list[str]:
    """Each lock the chain holds still held (a third description cannot take it), records intact."""
    problems = []
    pid = os.getpid()
    for taken in chain.taken:
        for name, path in zip(taken.names, taken.paths, strict=True):
            if probe_free(path):
                problems.append(
                    f"inherited hold released: {name} held by "
                    f"{chain.actor.wid}/{chain.thread_name} "
                    f"was free to a new open file description {when}"
                )
            elif taken.mode == "w":
                problem = record_problem(path, pid, chain.thread_name)
                if problem is not None:
                    problems.append(f"record of a live holder changed: {name} {when}: {problem}")
    return problems


def wait_child(pid: int, timeout: float) -> int | None:
    """Reap child ``pid``: its exit code (-N: signal N), or None if it still runs at ``timeout``."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        return None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _descriptor(taken: Taken) -> int | None:
    fd = getattr(taken.held, "fd", None)
    if isinstance(fd, int):
        return fd
    held_descriptor = getattr(taken.lock, "_held_descriptor", None)
    if callable(held_descriptor):
        with contextlib.suppress(Exception):
            found = held_descriptor()
            return found if isinstance(found, int) else None
    return None


# -- a child forked while holding ------------------------------------------------------


def fork_child(chain: Chain) -> None:
    """Fork a child that does one random thing; then check this thread's locks and records."""
    actor, rng = chain.actor, chain.rng
    behaviour = rng.choice(BEHAVIOURS)
    sabotage = actor.plan.sabotage
    # The "fork" sabotage keeps a duplicate of each held descriptor, which the
    # library does not know of, so the child can unlock the parent's lock: the
    # very effect of an inherited hold released by a child.
    global _parent_fds  # noqa: PLW0603 - read by the child only
    _parent_fds = {fd for t in chain.taken if (fd := _descriptor(t)) is not None}
    dups = []
    if sabotage == "fork":
        dups = [os.dup(fd) for t in chain.taken if (fd := _descriptor(t)) is not None]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _run_child(chain, behaviour, dups)  # returns only by raising
    for fd in dups:
        os.close(fd)
    status = wait_child(pid, actor.plan.patience)
    problems = []
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        problems.append(f"fork child ({behaviour}) did not end within {actor.plan.patience} s")
    elif status != 0:
        problems.append(f"fork child ({behaviour}) exited with status {status}")
    actor.write(f"D {actor.wid}.f{pid}")
    problems += check_holds(chain, f"after its forked child ({behaviour}) ended")
    for problem in problems:
        actor.send("bad", actor.wid, chain.tid, "fork: " + problem)
    actor.send("fork", actor.wid, behaviour, status)


def _run_child(chain: Chain, behaviour: str, dups: list[int]) -> None:
    global _child  # noqa: PLW0603 - this process's one role
    parent = chain.actor
    die_with_parent(parent.pid)
    wid = f"{parent.wid}.f{os.getpid()}"
    threading.current_thread().name = f"{wid}-t0"
    me = Actor(parent.plan, wid, parent.audit_fd, parent.sock)
    _child = (me, behaviour, None)
    rng = random.Random(os.getpid())
    try:
        _child_checks(chain, me, dups)
        ending = _behave(chain, me, behaviour, rng)
    except BaseException:  # noqa: BLE001 - a failure in the child's own code
        _child_bad(me, behaviour, "failed: " + traceback.format_exc())
        os._exit(1)
    _end(me, behaviour, ending)


def _child_bad(me: Actor, behaviour: str, text: str) -> None:
    me.send("bad", me.wid, 0, f"fork: child ({behaviour}) {text}".replace("\n", " | "))


def _child_checks(chain: Chain, me: Actor, dups: list[int]) -> None:
    """At the child's start: it keeps no descriptor that holds its parent's locks."""
    sabotage = me.plan.sabotage
    if sabotage == "fork":
        for fd in dups:
            fcntl.flock(fd, fcntl.LOCK_UN)
    elif sabotage == "record":
        for taken in chain.taken:
            if taken.mode == "w":
                for path in taken.paths:
                    os.truncate(path.with_name(path.name + ".owner"), 0)
    for taken in chain.taken:
        for name, path in zip(taken.names, taken.paths, strict=True):
            if kernel_says_holds(os.getpid(), path) and sabotage != "fork":
                _child_bad(me, "start", f"kept a descriptor that holds its parent's lock {name}")


def _behave(chain: Chain, me: Actor, behaviour: str, rng: random.Random) -> str:
    """Do the behaviour; return how to end."""
    if behaviour == "gc":
        gc.collect()
        return "_exit"
    if behaviour in ("_exit", "return", "sys.exit", "raise"):
        return behaviour
    if behaviour == "drop":
        _drop_inherited(chain)
    elif behaviour == "release":
        _release_inherited(chain, me)
    elif behaviour == "locks":
        _own_locks(chain, me, rng)
    elif behaviour == "same":
        _try_parents_lock(chain, me, rng)
    elif behaviour == "forget":
        _forget(chain, me, rng)
        return "_exit"  # the forgotten hold ends with the process
    return rng.choice(ENDINGS)


def _end(me: Actor, behaviour: str, ending: str) -> None:
    """End the child: at once, or by unwinding every frame (see :func:`child_finish`)."""
    global _child  # noqa: PLW0603
    if ending == "_exit":
        os._exit(0)
    if ending == "gc+_exit":
        gc.collect()
        os._exit(0)
    raised: BaseException = {
        "return": ChildReturn(),
        "sys.exit": SystemExit(0),
        "raise": ChildError("the child's deliberate exception"),
    }[ending]
    _child = (me, behaviour, raised)
    raise raised


def child_finish(exc: BaseException) -> None:
    """In a forked child whose stack unwound to the thread's top: end it, judging how it got here.

    The deliberate exception must arrive unchanged: leaving an inherited
    ``with`` (or an inherited ExitStack) raises nothing in a child.
    """
    if _child is None:  # not one of ours (cannot happen): leave quietly
        os._exit(2)
    me, behaviour, raised = _child
    if exc is not raised:
        text = "".join(traceback.format_exception(exc))
        _child_bad(me, behaviour, f"leaving the inherited holds raised: {text}")
        os._exit(1)
    gc.collect()
    os._exit(0)


def _drop_inherited(chain: Chain) -> None:
    """Drop every reference to the inherited holds (the ExitStack's too) and collect them."""
    chain.stack.pop_all()  # the callbacks are dropped, never called
    chain.taken.clear()
    gc.collect()


def _release_inherited(chain: Chain, me: Actor) -> None:
    """Release each inherited hold explicitly, then each inherited lock object."""
    for taken in chain.taken:
        release = getattr(taken.held, "release", None)
        if callable(release):
            try:
                release()
            except RuntimeError:
                pass  # an inherited hold holds nothing here
            except Exception as exc:  # noqa: BLE001 - reported
                _child_bad(
                    me, "release", f"hold.release() of inherited {taken.names} raised {exc!r}"
                )
        if taken.lock is not None:
            try:
                taken.lock.release()
            except RuntimeError:
                continue  # the API: an inherited object that holds nothing here
            except Exception as exc:  # noqa: BLE001 - reported
                _child_bad(
                    me, "release", f"lock.release() of inherited {taken.names} raised {exc!r}"
                )
                continue
            _child_bad(
                me,
                "release",
                f"lock.release() of inherited {taken.names} did not raise RuntimeError",
            )


def _free_names(chain: Chain) -> list[str]:
    held = {name for taken in chain.taken for name in taken.names}
    names = [f"p{i}" for i in range(N_PACKS)] + [f"b{i}" for i in range(N_BACKENDS)]
    return [name for name in names if name not in held]


def _own_locks(chain: Chain, me: Actor, rng: random.Random) -> None:
    """Take locks the parent does not hold; meanwhile drop or release the inherited holds."""
    # At most one pack and one backend, packs first: the tier order.
    free = _free_names(chain)
    packs = [name for name in free if name[0] == "p"]
    backends = [name for name in free if name[0] == "b"]
    wanted = [rng.choice(group) for group in (packs, backends) if group and rng.random() < 0.7]
    with ExitStack() as stack:
        own = Chain(me, 0, rng, stack)
        # Fill the free numbers below the parent's lowest lock descriptor (closed
        # here at the fork), so the child's next lock file gets exactly that number.
        fillers = _fill_below(min(_parent_fds, default=0))
        for fd in fillers:
            stack.callback(os.close, fd)
        for name in wanted:
            lock: Any = (
                own.pack(int(name[1:])) if name[0] == "p" else me.plan.locks.backends[int(name[1:])]
            )
            style = rng.choice(("short", "try", "cancel"))

            def attempt(timeout: float | None, cancel: Any, lock: Any = lock) -> Any:
                return lock.acquire(timeout=timeout, cancel=cancel)

            try:
                own.take([name], "w", attempt, lock.try_acquire, lock=lock, style=style)
            except (LockTimeout, LockBusy, LockCancelled):
                break
            if _descriptor(own.taken[-1]) in _parent_fds:
                me.send("reuse", me.wid)  # this lock's descriptor has an inherited one's number
        action = rng.choice(("drop", "release", "keep"))
        if action == "drop":
            _drop_inherited(chain)
        elif action == "release":
            _release_inherited(chain, me)
        gc.collect()
        for taken in own.taken:
            for name, path in zip(taken.names, taken.paths, strict=True):
                if probe_free(path):
                    _child_bad(
                        me,
                        "locks",
                        f"its own lock {name} was released when it did '{action}' to the "
                        "inherited holds (descriptor reuse)",
                    )
        own.dwell()


def _fill_below(target: int) -> list[int]:
    """Open /dev/null until the lowest free descriptor number is ``target`` (if it is free)."""
    fillers: list[int] = []
    while target:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd >= target:
            os.close(fd)
            break
        fillers.append(fd)
    return fillers


def _try_parents_lock(chain: Chain, me: Actor, rng: random.Random) -> None:
    """Try, through the inherited lock object, a lock the parent holds: it must be busy."""
    candidates = [t for t in chain.taken if t.lock is not None]
    if not candidates:
        return
    taken = rng.choice(candidates)
    try:
        hold = taken.lock.try_acquire()
    except LockBusy:
        return
    except Exception as exc:  # noqa: BLE001 - reported
        _child_bad(me, "same", f"try_acquire of its parent's lock {taken.names} raised {exc!r}")
        return
    me.audit(0, "E", taken.names, "w", threading.current_thread().name)
    _child_bad(me, "same", f"took its parent's lock {taken.names} while the parent holds it")
    me.audit(0, "X", taken.names, "w")
    hold.release()
    me.audit(0, "R", taken.names, "w")


def _forget(chain: Chain, me: Actor, rng: random.Random) -> None:
    """Take a lock, drop every reference to it, collect garbage: it must stay held."""
    choices = _free_names(chain)
    if not choices:
        return
    name = rng.choice(choices)
    path = me.plan.locks.paths()[name]
    target = path.parent if name[0] == "p" else me.layout.backend(int(name[1:]))
    me.audit(0, "W", [name], "w", "short")
    try:
        (PackLock(target) if name[0] == "p" else BackendLock(target)).acquire(timeout=0.05)
    except (LockTimeout, LockBusy):
        me.audit(0, "F", [name], "w", "short")
        return
    me.audit(0, "E", [name], "w", threading.current_thread().name)
    gc.collect()
    if probe_free(path):
        _child_bad(me, "forget", f"{name}, acquired and then unreferenced, was released by gc")
    me.audit(0, "X", [name], "w")  # released by the exit that follows


# -- a fork pool under a held lock ----------------------------------------------------------


def sync_with_pool(chain: Chain) -> None:
    """Take the workspace lock (or a permit when a sync runs), and run a fork pool under it."""
    actor, rng = chain.actor, chain.rng
    locks = actor.plan.locks
    workspace = locks.workspace
    taken = False
    if rng.random() < 0.7:
        try:
            chain.take(
                ["ws"],
                "w",
                lambda t, c: workspace.acquire(timeout=t, cancel=c),
                workspace.try_acquire,
                lock=workspace,
            )
            taken = True
        except WorkspaceBusy:
            pass
    if not taken:
        sched = locks.scheduler
        chain.take(None, "w", lambda t, c: sched.acquire(timeout=t, cancel=c), sched.try_acquire)
    context = multiprocessing.get_context("fork")
    deadline = time.monotonic() + actor.plan.patience + 10.0
    tasks = rng.randint(2, 4)
    pool = ProcessPoolExecutor(
        max_workers=2, mp_context=context, initializer=_pool_init, initargs=(actor,)
    )
    problems: list[str] = []
    results: list[tuple[str, str, list[int]]] = []
    processes: list[Any] = []
    timed_out = False
    try:
        futures = [pool.submit(_pool_task, rng.getrandbits(32)) for _ in range(tasks)]
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for future in futures:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
    except TimeoutError:
        timed_out = True
        problems.append(f"fork pool: a task did not finish within {actor.plan.patience + 10} s")
    except BrokenProcessPool as exc:
        problems.append(f"fork pool broke (a pool worker died): {exc!r}")
    finally:
        if timed_out:
            for process in processes:
                with contextlib.suppress(Exception):
                    process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    for process in processes:
        actor.write(f"D {actor.wid}.q{process.pid}")
        if process.exitcode not in (0, None) and not timed_out:
            problems.append(f"fork pool worker {process.pid} exited with status {process.exitcode}")
    problems += check_holds(chain, "after a fork pool ran under it")
    for problem in problems:
        actor.send("bad", actor.wid, chain.tid, "fork: " + problem)
    ok = sum(outcome == "ok" for _, outcome, _ in results)
    for wid, outcome, acks in results:
        for seq in acks:
            actor.send("ack", wid, seq)
        if outcome == "deadline":
            actor.send("bad", wid, 0, f"deadline: a wait of {actor.plan.patience} s ran out")
    actor.send("pool", actor.wid, tasks, ok, len(processes))


def _pool_init(parent: Actor) -> None:
    """A fork pool worker: it dies with the worker, and audits under its own name."""
    global _pool_actor  # noqa: PLW0603 - this process's one role
    die_with_parent(parent.pid)
    wid = f"{parent.wid}.q{os.getpid()}"
    threading.current_thread().name = f"{wid}-t0"
    _pool_actor = Actor(parent.plan, wid, parent.audit_fd, parent.sock)


def _pool_task(seed: int) -> tuple[str, str, list[int]]:
    """One pool task: a pack, then maybe the manifest; returns (wid, outcome, acknowledged seqs)."""
    me = _pool_actor
    assert me is not None
    rng = random.Random(seed)
    outcome = "ok"
    acks: list[int] = []
    try:
        with ExitStack() as stack:
            chain = Chain(me, 0, rng, stack)
            chain.take_pack(rng.randrange(N_PACKS))
            if rng.random() < 0.6:
                chain.take_manifest(write=rng.random() < 0.5)
            chain.dwell()
        acks = chain.acks
    except PatienceExceeded:
        outcome = "deadline"
    except (LockTimeout, LockBusy, LockCancelled):
        outcome = "refused"
    return me.wid, outcome, acks


# -- a child program that inherits a held lock, as `grex-locks run` does ---------------------------


def hand_to_inheritor(chain: Chain) -> None:
    """Run a child program with a held lock's descriptor, as ``grex-locks run`` runs CMD."""
    actor, rng = chain.actor, chain.rng
    candidates = [
        (taken, fd)
        for taken in chain.taken
        if len(taken.names) == 1
        and taken.names[0][0] in "pb"
        and (fd := _descriptor(taken)) is not None
    ]
    if not candidates:
        return
    taken, fd = rng.choice(candidates)
    name = taken.names[0]
    actor.write(f"V {actor.wid} {chain.tid} {name}")
    life = rng.uniform(0.3, 1.5)  # how long it lives on when orphaned
    argv = [sys.executable, "-I", "-S", str(INHERITOR), str(actor.layout.audit)]
    argv += [actor.wid, name, str(fd), f"{life:.3f}"]
    child = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], actor.plan.patience)
        if not ready or not child.stdout.readline():
            actor.send("bad", actor.wid, chain.tid, "error: the inheritor did not start")
        chain.dwell()
        with contextlib.suppress(OSError):
            child.stdin.write(b"q")
            child.stdin.close()
        child.wait(timeout=actor.plan.patience)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    actor.write(f"K {actor.wid} {name} {child.pid}")
    actor.send("inherit", actor.wid, name)
