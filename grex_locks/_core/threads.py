"""Starting helper threads, and seeing the Ctrl-C that CPython's threading can disguise."""

from __future__ import annotations

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
    """Start a daemon thread; an interrupt that breaks its start surfaces as itself."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:
        raise surface_interrupt(exc) from None
    return thread
