"""Running a command that inherits a held lock, as util-linux ``flock`` does without ``-o``.

The command gets the very descriptor whose open file description holds the
flock, so the lock covers it even if ``grex-locks run`` itself is killed:
the lock is freed only when the last process holding that description
exits (or ``run`` releases it after the command ends).

Signals sent to ``run`` are passed on to the command, except a Ctrl-C or
Ctrl-\\ typed at the terminal: the terminal sends those to the whole
foreground process group, the command included, and passing them on would
deliver them twice. Which is which only the signal's ``siginfo`` tells
(``si_code`` is ``SI_KERNEL`` for the terminal, ``SI_USER``/``SI_TKILL``/
``SI_QUEUE`` for ``kill``, ``raise``, ``sigqueue``), and Python handlers do not
see it, so the main thread blocks the signals and collects them with
``sigwaitinfo`` while the command runs::

    main thread:  block signals -> spawn CMD -> sigwaitinfo loop -> reap CMD
                                       |            ^ SIGCHLD (thread-directed)
    waiter:                            +-> waitid(CMD, WNOWAIT) --+
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

#: Signals sent to ``grex-locks run`` that are passed on to its command.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Signals a terminal sends to its whole foreground process group (the command too).
_TERMINAL_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT})
#: ``si_code`` of a signal the kernel itself sent (a terminal's), ``<asm-generic/siginfo.h>``.
_SI_KERNEL = 0x80
#: Runs an executable file the kernel cannot (a script without "#!").
_SHELL = "/bin/sh"
# What the command starts with at their default action (besides the forwarded
# signals, which this process handles), as subprocess's restore_signals gives:
# Python ignores SIGPIPE and SIGXFSZ, which exec keeps.
_DEFAULT_IN_COMMAND = (signal.SIGPIPE, signal.SIGXFSZ)


def _terminal_sent_it() -> bool:
    # Only for a signal whose siginfo was lost (see _Forwarder.without_info):
    # in the terminal's foreground group, guess the terminal.
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


class EndedByTerminal(Exception):
    """CMD died of a signal the terminal sent to it and to ``run`` (Ctrl-C, Ctrl-\\).

    A shell ends a loop (``for p in ...; do grex-locks run ...; done``) only
    when the program it waited for died of that SIGINT itself; a program that
    exits 130 instead is taken to have handled it. So once its lock is let
    go, ``run`` dies of :attr:`signum` too (see :func:`die_of`).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def die_of(signum: int) -> int:
    """End this process by ``signum`` at its default action; 128+N if it does not end it."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum  # pragma: no cover - the signal ended the process


class _Forwarder:
    """Passes signals on to the command once it runs; holds those that came before."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.finished = False
        self.early: list[int] = []
        #: Signals the terminal sent to the command and to run alike (not passed on).
        self.from_terminal: set[int] = set()

    def start(self, pid: int) -> None:
        self.pid = pid
        # These came before the command existed: whoever sent them, it has
        # not seen them.
        for signum in self.early:
            os.kill(pid, signum)

    def with_info(self, info: signal.struct_siginfo) -> None:
        """Pass on a signal collected with its siginfo, unless the terminal sent it to CMD too."""
        if self.pid is None or self.finished:
            return
        if (
            info.si_signo in _TERMINAL_SIGNALS
            and info.si_code == _SI_KERNEL
            and _same_group(self.pid)
        ):
            self.from_terminal.add(info.si_signo)
            return
        os.kill(self.pid, info.si_signo)

    def without_info(self, signum: int, frame: FrameType | None) -> None:
        """The handler for a signal a helper thread caught while the main thread was busy.

        Signals are blocked only in this thread; a lock library's helper
        thread started earlier may take one delivered in the instant between
        two ``sigwaitinfo`` calls, and then only this handler sees it.
        """
        del frame
        if self.finished:
            return
        if self.pid is None:
            self.early.append(signum)
        elif not (signum in _TERMINAL_SIGNALS and _terminal_sent_it()):
            os.kill(self.pid, signum)


def _same_group(pid: int) -> bool:
    """Whether ``pid`` is in this process's group, where the terminal's signal reached it too."""
    try:
        return os.getpgid(pid) == os.getpgrp()
    except OSError:
        return False


def _drain(signals: frozenset[int]) -> list[signal.struct_siginfo]:
    """The pending ``signals``, taken without waiting."""
    taken = []
    while (info := signal.sigtimedwait(signals, 0)) is not None:
        taken.append(info)
    return taken


def _close_inherited(keep: int) -> list[tuple[int, int]]:
    """Spawn actions closing inherited descriptors, as subprocess's ``close_fds`` does.

    The command gets stdin, stdout, stderr and the lock's descriptor, not
    whatever else this process was handed without close-on-exec.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    actions = []
    for fd in map(int, names):
        try:
            if fd > 2 and fd != keep and os.get_inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return actions


def _spawn(command: list[str], lock_fd: int, mask: Iterable[int], forwarded: Iterable[int]) -> int:
    """Start ``command`` with ``lock_fd`` inherited, signals unblocked and at their defaults.

    posix_spawn sets the child's mask and dispositions before exec, so a
    signal pending from the terminal acts on the command as on any program.
    """
    os.set_inheritable(lock_fd, True)
    options: dict[str, Any] = {
        "file_actions": _close_inherited(lock_fd),
        "setsigmask": mask,
        "setsigdef": (*forwarded, *_DEFAULT_IN_COMMAND),
    }
    try:
        try:
            return os.posix_spawnp(command[0], command, os.environ, **options)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
        # An executable without "#!" (or any format the kernel knows): a
        # shell script, run by /bin/sh as execvp and util-linux flock do.
        script = command[0] if "/" in command[0] else shutil.which(command[0])
        if script is None:  # pragma: no cover - posix_spawnp just found it
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command[0])
        return os.posix_spawn(_SHELL, [_SHELL, script, *command[1:]], os.environ, **options)
    finally:
        os.set_inheritable(lock_fd, False)


def _announce_exit(pid: int, main: int, exited: threading.Event) -> None:
    # WNOWAIT leaves the command a zombie, so its pid is never reused while
    # signals may still be sent to it; the main thread reaps it.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    exited.set()
    # Thread-directed, so it waits for the main thread's sigwaitinfo even
    # if a helper thread would have taken (and dropped) a process-wide one.
    signal.pthread_kill(main, signal.SIGCHLD)


def run_holding(command: list[str], lock_fd: int) -> int:
    """Run ``command`` with ``lock_fd`` inherited; return its exit status as a shell would.

    127 when the command is not found, 126 when it cannot be executed (not
    permitted, not an executable format, a directory), 128+N when it died of
    signal N. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process are
    passed on to the command (SIGINT and SIGQUIT typed at the terminal
    already reached it, and are not sent again).
    """
    forwarder = _Forwarder()
    # A signal the caller ignores (nohup's SIGHUP; SIGINT and SIGQUIT for a
    # shell's background job) stays ignored, here and in CMD, as exec keeps it
    # for any program: it is neither collected, nor passed on, nor reset.
    forwarded = frozenset(
        sig for sig in FORWARDED_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN
    )
    collected = forwarded | {signal.SIGCHLD}
    # Blocked first, so that threads started from here (the waiter) inherit it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, collected)
    previous = {sig: signal.signal(sig, forwarder.without_info) for sig in forwarded}
    try:
        forwarder.early += [info.si_signo for info in _drain(forwarded)]
        try:
            pid = _spawn(command, lock_fd, mask, forwarded)
        except FileNotFoundError:
            print(f"grex-locks: error: command not found: {command[0]}", file=sys.stderr)
            return 127
        except OSError as exc:
            why = exc.strerror or str(exc)
            print(f"grex-locks: error: cannot execute {command[0]}: {why}", file=sys.stderr)
            return 126
        exited = threading.Event()
        waiter = threading.Thread(
            target=_announce_exit,
            args=(pid, threading.get_ident(), exited),
            name="grex-locks-run-wait",
            daemon=True,
        )
        waiter.start()
        forwarder.start(pid)
        while not exited.is_set():
            info = signal.sigwaitinfo(collected)
            if info.si_signo != signal.SIGCHLD:
                forwarder.with_info(info)
        # Set before the reaping: once reaped, the pid may be someone else's.
        forwarder.finished = True
        _, status = os.waitpid(pid, 0)
        waiter.join()
        _drain(collected)  # for the command, which is gone
    finally:
        forwarder.finished = True
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    if code < 0 and -code in forwarder.from_terminal:
        raise EndedByTerminal(-code)
    return 128 - code if code < 0 else code
