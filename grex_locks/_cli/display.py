"""How the command line shows things: commands a shell can take back, aligned tables, paragraphs.

Anything printed as a command — a holder's command line, or one for the
person to type — is quoted word by word (``shlex``), so ``flock x -c 'sleep
30'`` is not ``flock x -c sleep 30``, and a path with a space in it can be
pasted back. Columns are measured in terminal cells, not characters: an East
Asian wide character takes two.
"""

from __future__ import annotations

import os
import shlex
import textwrap
import unicodedata
from collections.abc import Sequence

#: A command line in a table is cut to this many terminal cells.
COMMAND_CELLS = 60

# A space inside a `command` must not be where a paragraph wraps: the
# command would no longer read (or paste) as one. NO-BREAK SPACE is not
# whitespace to textwrap.
_KEEP = "\u00a0"


def shell(*words: object) -> str:
    """A command for a person to type, in backticks, every word quoted for the shell."""
    return f"`{shlex.join(str(word) for word in words)}`"


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes, so that it stays on its line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def command_line(argv: object) -> str:
    """``argv`` as a shell would take it back, program by its base name; ``""`` if none.

    A record's ``argv`` is ``sys.argv``, which for ``python -c CODE`` starts
    with a bare ``-c`` (CODE itself is not kept): that is shown as
    ``python -c``, not as a command named ``-c``.
    """
    if not isinstance(argv, list) or not argv or not all(isinstance(w, str) for w in argv):
        return ""
    program, *rest = argv
    words = ["python", "-c"] if program == "-c" else [os.path.basename(program) or program]
    return printable(shlex.join([*words, *rest]))


def cells(text: str) -> int:
    """How many terminal columns ``text`` takes: wide characters two, combining marks none."""
    return sum(_cells(c) for c in text)


def _cells(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` terminal cells, ending in "…" when cut short."""
    if cells(text) <= limit:
        return text
    kept, used = [], 0
    for char in text:
        used += _cells(char)
        if used > limit - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` as aligned columns two cells apart; the last column is not padded."""
    widths = [max(cells(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        padded = [
            cell + " " * (width - cells(cell)) for cell, width in zip(row[:-1], widths, strict=True)
        ]
        lines.append("  ".join([*padded, row[-1]]))
    return "\n".join(lines)


def paragraph(text: str, width: int = 100) -> str:
    """``text`` wrapped and indented two spaces, never breaking inside a `command`."""
    # Odd parts are inside backticks; a text already holding the marker would
    # not survive the round trip, so it is wrapped as plain text.
    parts = [text] if _KEEP in text else text.split("`")
    kept = "`".join(p.replace(" ", _KEEP) if i % 2 else p for i, p in enumerate(parts))
    wrapped = textwrap.fill(
        kept,
        width=width,
        initial_indent="  ",
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return wrapped.replace(_KEEP, " ")
