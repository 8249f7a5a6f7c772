"""MkDocs hook: the command-line reference, written from the argparse parser at every build.

``docs/reference/cli.md`` holds a marker line; :func:`on_page_markdown` replaces it with
:func:`render_cli_reference` of :func:`icl_retriever.cli.parser.build_parser`, so the page lists exactly
the commands and flags the installed ``icl-retriever`` accepts and cannot drift from them
(``tests/test_docs.py`` checks the rendering against the parser).
"""

from __future__ import annotations

import argparse
from typing import Any

#: The line of ``reference/cli.md`` replaced by the generated reference.
MARKER = "<!-- cli-reference -->"
#: The page that carries the marker.
PAGE = "reference/cli.md"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, newlines folded)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _help(action: argparse.Action, prog: str) -> str:
    """An action's help with argparse's ``%(default)s``-style fields expanded, as ``--help`` prints it."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params: dict[str, Any] = dict(vars(action), prog=prog)
    for name, value in list(params.items()):
        if value is argparse.SUPPRESS:
            del params[name]
        elif hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return action.help % params


def _names(action: argparse.Action) -> str:
    """How an argument is written: its flags (``-k``, ``--fetch-k N``) or a positional's metavar."""
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{name}`" + (" ..." if action.nargs in ("+", "*") else "")
    if action.nargs == 0:
        return ", ".join(f"`{flag}`" for flag in action.option_strings)
    if action.choices is not None and action.metavar is None:
        value = "{" + ", ".join(str(c) for c in action.choices) + "}"
    else:
        value = action.metavar or action.dest.upper()
    value = f"[{value}]" if action.nargs == "?" else value
    return ", ".join(f"`{flag} {value}`" for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    """The default worth showing (not for switches, required or unset arguments)."""
    if action.nargs == 0 or action.required or action.default in (None, argparse.SUPPRESS, [], False):
        return ""
    return f"`{action.default}`"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every sub-command, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            out.extend((name, helps.get(name, ""), sub) for name, sub in action.choices.items())
    return out


def _arguments(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """The Markdown table of a parser's arguments (``--help`` itself left out)."""
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        required = " (required)" if action.required and action.option_strings else ""
        rows.append(f"| {_names(action)}{required} | {_default(action)} | {_cell(_help(action, prog))} |")
    return rows


def _usage(parser: argparse.ArgumentParser, width: int = 100) -> str:
    """The usage line as ``--help`` prints it, wrapped at ``width`` whatever the terminal."""
    formatter = argparse.HelpFormatter(parser.prog, width=width)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip("\n")


def render_cli_reference(parser: argparse.ArgumentParser) -> str:
    """The Markdown reference of a parser: its global flags, then one section per sub-command with its
    usage line and a table of every argument.

    Args:
        parser: the top-level parser (``build_parser()``).

    Returns:
        Markdown text: one ``## icl-retriever COMMAND`` section per sub-command.
    """
    prog = parser.prog
    subcommands = _subcommands(parser)
    lines = [f"`{prog}` has {len(subcommands)} commands:", ""]
    lines += [f"- [`{name}`](#{prog}-{name}): {_cell(help_)}" for name, help_, _ in subcommands]
    lines += ["", "Global flags:", "", *_arguments(parser, prog), ""]
    for name, help_, sub in subcommands:
        usage = _usage(sub)
        lines += [f"## {prog} {name}", "", help_[:1].upper() + help_[1:] + ".", "", "```text", usage, "```", ""]
        lines += [*_arguments(sub, sub.prog), ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: fill the marker of the CLI reference page (other pages pass through)."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lacks the marker line {MARKER!r} that the CLI reference replaces")
    from icl_retriever.cli.parser import build_parser

    return markdown.replace(MARKER, render_cli_reference(build_parser()))
