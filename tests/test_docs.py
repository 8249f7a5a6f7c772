"""The documentation site: the CLI reference is the parser's, the API reference covers the public names,
and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import icl_retriever
from icl_retriever.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HOOKS = DOCS / "_hooks"

#: The integration classes and functions the API reference renders beside ``icl_retriever.__all__``.
INTEGRATION_NAMES = [
    "icl_retriever.integrations.langchain.PIERetriever",
    "icl_retriever.integrations.langchain.PIEExampleSelector",
    "icl_retriever.integrations.langchain.demo_to_document",
    "icl_retriever.integrations.langchain.demo_to_example",
    "icl_retriever.integrations.dspy.PIEFewShot",
    "icl_retriever.integrations.dspy.pie_embedder",
    "icl_retriever.integrations.dspy.demo_to_example",
]


def _hook(name: str = "cli_reference"):
    spec = importlib.util.spec_from_file_location(name, HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _sections(markdown: str, prog: str) -> dict[str, str]:
    """The generated reference split into its ``## prog COMMAND`` sections."""
    parts = re.split(rf"^## {re.escape(prog)} (\S+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_lists_every_command_and_flag() -> None:
    parser = build_parser()
    sections = _sections(_hook().render_cli_reference(parser), parser.prog)
    commands = _subcommands(parser)
    assert list(sections) == list(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                for flag in action.option_strings:
                    assert re.search(rf"`{re.escape(flag)}[` ]", sections[name]), f"{name}: {flag} missing"
            else:
                assert f"`{action.metavar or action.dest}`" in sections[name], f"{name}: {action.dest} missing"
            if action.help:
                first_words = " ".join(action.help.split()[:4]).replace("%%", "%")
                assert first_words in sections[name].replace("\\|", "|"), f"{name}: help of {action.dest}"


def test_cli_reference_follows_the_parser() -> None:
    """A flag added to the parser appears in the reference with no edit to the docs."""
    parser = build_parser()
    commands = _subcommands(parser)
    commands["query"].add_argument("--brand-new-flag", metavar="X", help="a flag the docs never heard of")
    text = _sections(_hook().render_cli_reference(parser), parser.prog)["query"]
    assert "`--brand-new-flag X`" in text and "a flag the docs never heard of" in text


@pytest.mark.parametrize("name", ["cli_reference", "search_controls"])
def test_generated_pages_have_their_marker_and_hook(name: str) -> None:
    hook = _hook(name)
    assert hook.MARKER in (DOCS / hook.PAGE).read_text(encoding="utf-8")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert f"docs/_hooks/{name}.py" in config["hooks"]


def test_search_controls_table_has_every_control_and_its_flag() -> None:
    """One row per SearchControls field, with the ``query`` flag of the same destination."""
    from icl_retriever.search.controls import SearchControls

    parser = build_parser()
    rows = _hook("search_controls").render_controls_table(SearchControls, parser).splitlines()[2:]
    names = [re.match(r"\| `(\w+)=", row).group(1) for row in rows]
    assert names == [name for name in SearchControls.model_fields if name != "k"]
    query = _subcommands(parser)["query"]
    for name, row in zip(names, rows):
        [action] = [a for a in query._actions if a.dest == name]
        assert f"`{action.option_strings[-1]}" in row, name


def _api_directives() -> set[str]:
    found: set[str] = set()
    for page in (DOCS / "reference").rglob("*.md"):
        found.update(re.findall(r"^::: (\S+)$", page.read_text(encoding="utf-8"), flags=re.M))
    return found


def test_api_reference_renders_every_public_name() -> None:
    directives = _api_directives()
    missing = [name for name in icl_retriever.__all__ if f"icl_retriever.{name}" not in directives]
    assert not missing, f"no ::: directive for {missing} under docs/reference/api/"
    assert not [name for name in INTEGRATION_NAMES if name not in directives]


def _nav_files(nav: list) -> list[str]:
    files: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files.extend(_nav_files(value) if isinstance(value, list) else [value])
    return files


def test_every_page_is_in_the_nav() -> None:
    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert sorted(pages - set(nav)) == [], "pages missing from the nav of mkdocs.yml"


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes, and the built API and CLI pages hold what a reader looks for."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe_pydantic"):
        pytest.importorskip(module, reason='needs pip install "icl-retriever[docs]"')
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    retriever = (site / "reference" / "api" / "retriever" / "index.html").read_text(encoding="utf-8")
    for anchor in ("icl_retriever.Retriever", "icl_retriever.Retriever.get_demos", "icl_retriever.Retriever.from_index"):
        assert f'id="{anchor}"' in retriever, anchor
    langchain = (site / "reference" / "api" / "langchain" / "index.html").read_text(encoding="utf-8")
    assert 'id="icl_retriever.integrations.langchain.PIERetriever"' in langchain
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "cli-reference" not in cli and "--rerank-margin" in cli
