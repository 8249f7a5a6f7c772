"""Griffe extension: Sphinx roles in docstrings (``:meth:`from_index```) rendered as inline code.

The package's docstrings use Sphinx roles, which read well in ``help()`` and editors; Markdown has no
such syntax and would print ``:meth:`` literally. This extension rewrites each role to inline code of
its target (``~a.b.c`` -> ``c``, as Sphinx shows it) when mkdocstrings loads the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def rst_roles_to_code(text: str) -> str:
    """``text`` with every Sphinx role replaced by inline code of its target."""
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class RstRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring in a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rst_roles_to_code(obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
