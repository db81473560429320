"""A minimal undo stack: each acquire step registers how to take itself back.

It is :class:`contextlib.ExitStack` reduced to the part the lock pipeline
uses (plain callbacks, run last-in first-out), because an uncontended
acquire+release runs six of them and ``ExitStack``'s generality costs about
as much as the ``flock`` itself. Every callback runs even if an earlier one
fails; the first failure is raised afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any


class Undo:
    """Callbacks run newest first on :meth:`close`, or when a ``with`` is left by an exception."""

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callback(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Register ``fn(*args)`` to run when this stack unwinds."""
        self._steps.append((fn, args))

    def pop_all(self) -> Undo:
        """Move every callback to a new stack (the acquire succeeded; keep them for release)."""
        moved = Undo()
        moved._steps, self._steps = self._steps, []
        return moved

    def close(self) -> None:
        """Run every callback, newest first; raise the first failure at the end."""
        first_error: BaseException | None = None
        steps, self._steps = self._steps, []
        while steps:
            fn, args = steps.pop()
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - keep unwinding, re-raise below
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def __enter__(self) -> Undo:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # The exception that left the block is the one to see, not an undo's.
        with contextlib.suppress(BaseException):
            self.close()
