"""Starting helper threads, and seeing the Ctrl-C that CPython's threading can disguise."""

from __future__ import annotations

import importlib
import signal
import threading
from collections.abc import Callable, Iterable

# ``signal.valid_signals()`` and ``signal.pthread_sigmask`` build an enum
# member per signal on every call (about 0.2 ms a thread start, on the path
# of every wait with a timeout); the C functions under them take and give
# plain numbers.
_signal = importlib.import_module("_signal")  # no type stubs: it is signal's C half
#: ``pthread_sigmask``, or None where signal masks do not exist.
_sigmask: Callable[[int, Iterable[int]], set[int]] | None = getattr(
    _signal, "pthread_sigmask", None
)
_ALL_SIGNALS: frozenset[int] = frozenset(_signal.valid_signals())


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
    if _sigmask is None:
        _start(thread)
        return thread
    # The mask to restore is read before anything changes: an interruption
    # right after blocking must not leave this thread deaf to every signal.
    previous = _sigmask(signal.SIG_BLOCK, ())
    try:
        _sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        _start(thread)
    finally:
        _sigmask(signal.SIG_SETMASK, previous)
    return thread


def _start(thread: threading.Thread) -> None:
    try:
        thread.start()
    except RuntimeError as exc:
        raise surface_interrupt(exc) from None
