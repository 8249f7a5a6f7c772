"""MkDocs hook: the table of search controls, written from their one definition at every build.

``docs/guides/search-controls.md`` holds a marker line; :func:`on_page_markdown` replaces it with
:func:`render_controls_table`: one row per field of
:class:`icl_retriever.search.controls.SearchControls` (keyword, default, description) with the flag of
``icl-retriever query`` that sets it, found in the parser by its destination. A control added to the model
appears here with no edit to the page (``tests/test_docs.py`` checks it).
"""

from __future__ import annotations

import argparse
from typing import Any

#: The line of the guide replaced by the generated table.
MARKER = "<!-- search-controls -->"
#: The page that carries the marker.
PAGE = "guides/search-controls.md"


def _query_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Destination -> how the flag is written (``--fetch-k N``) for ``icl-retriever query``."""
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {}
    for action in subparsers.choices["query"]._actions:
        if not action.option_strings:
            continue
        flag = action.option_strings[-1]
        if action.nargs != 0:
            value = action.metavar or "{" + ", ".join(map(str, action.choices or [])) + "}"
            flag += f" [{value}]" if action.nargs == "?" else f" {value}"
        flags[action.dest] = flag
    return flags


def render_controls_table(controls: Any, parser: argparse.ArgumentParser) -> str:
    """The Markdown table of the search controls.

    Args:
        controls: the pydantic model defining the controls (``SearchControls``).
        parser: the top-level CLI parser, whose ``query`` flags are looked up by destination.

    Returns:
        A table with one row per control (``k`` left out: it is the positional argument of every call).
    """
    flags = _query_flags(parser)
    rows = ["| keyword (default) | `query` flag | what it does |", "|---|---|---|"]
    for name, field in controls.model_fields.items():
        if name == "k":
            continue
        default = field.get_default(call_default_factory=True)
        flag = f"`{flags[name]}`" if name in flags else "(Python only)"
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}={default!r}` | {flag} | {text} |")  # a pipe inside a code span is text
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: fill the marker of the search-controls guide (other pages pass through)."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lacks the marker line {MARKER!r} that the controls table replaces")
    from icl_retriever.cli.parser import build_parser
    from icl_retriever.search.controls import SearchControls

    return markdown.replace(MARKER, render_controls_table(SearchControls, build_parser()))
