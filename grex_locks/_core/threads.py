"""Starting helper threads, and seeing the Ctrl-C that CPython's threading can disguise."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def surface_interrupt(exc: RuntimeError) -> BaseException:
    """The KeyboardInterrupt behind a CPython threading error it caused, else ``exc``.

    A ``KeyboardInterrupt`` landing inside ``threading.Condition`` code (in
    ``Thread.start()`` or ``Event.wait()``) can come out as ``RuntimeError:
    release unlocked lock``; the person pressed Ctrl-C, so they get that back.
    """
    cause = exc.__context__
    if cause is not None and not isinstance(cause, Exception):
        return cause
    return exc


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread that takes no signals; an interrupt that breaks its start surfaces.

    The kernel delivers a process-directed signal to any thread that does not
    block it, so a helper thread left waiting in ``flock`` could take a
    signal the program collects with ``sigwait`` in its own thread
    (``grex-locks run`` does). CPython runs signal handlers in the main
    thread whichever thread took the signal, so nothing is lost by blocking
    them all in helpers; the new thread inherits the mask it is started with.
    """
    thread = threading.Thread(target=target, name=name, daemon=True)
    previous = _block_all_signals()
    try:
        thread.start()
    except RuntimeError as exc:
        raise surface_interrupt(exc) from None
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def _block_all_signals() -> set[int | signal.Signals] | None:
    """Block every signal in this thread; the mask before, or None where masks do not exist."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
