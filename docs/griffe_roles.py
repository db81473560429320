"""A griffe extension for the docs build: Sphinx roles in docstrings become Markdown.

The package's docstrings name other objects Sphinx-style (``:class:`LockBusy```).
MkDocs renders Markdown, where that would show the role literally. This turns
a role naming a public name of ``grex_locks`` into a cross-reference to its
reference entry, and any other role into plain inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import grex_locks

_ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|mod|obj):`~?\.?([^`]+)`")
_PUBLIC = frozenset(grex_locks.__all__)


def _markdown(match: re.Match[str]) -> str:
    target = match.group(1)
    head = target.split(".")[0]
    if head in _PUBLIC:
        return f"[`{target}`][grex_locks.{target}]"
    return f"`{target.rsplit('.', 1)[-1] if target.startswith('grex_locks.') else target}`"


def roles_to_markdown(text: str) -> str:
    """``text`` with every Sphinx role replaced by a Markdown cross-reference or code."""
    return _ROLE.sub(_markdown, text)


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite each docstring's Sphinx roles as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = roles_to_markdown(obj.docstring.value)
