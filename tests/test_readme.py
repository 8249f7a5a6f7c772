"""README.md cannot rot: every fenced Python and shell block in it runs, in the order it is written.

Python blocks share one namespace; shell blocks run in bash (``icl-retriever`` is this checkout's CLI, run as
``python -m icl_retriever.cli``); all of them in one temporary directory, so a block may use what an earlier
one wrote. A block may be skipped only when the line before its fence says why,
``<!-- readme-test: skip (reason) -->``, and at most three are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
#: Fenced blocks that are not code to run (sample output).
NOT_CODE = {"text"}
MAX_SKIPPED = 3
MAX_LINES = 250

_FENCE = re.compile(
    r"^(?:<!-- readme-test: skip \((?P<why>[^\n]+?)\) -->\n)?```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    """One fenced block of README.md."""

    line: int  # line of the opening fence, 1-based
    lang: str
    body: str
    skip: str | None  # the reason given, or None when the block runs


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order.

    Raises:
        ValueError: a block has no language or one this test cannot run.
    """
    blocks = []
    for m in _FENCE.finditer(text):
        lang = m["lang"].strip().lower()
        line = text.count("\n", 0, m.start("lang")) + 1
        if lang not in PYTHON | SHELL | NOT_CODE:
            raise ValueError(f"README.md line {line}: a fenced block needs a language this test runs, not {lang!r}")
        blocks.append(Block(line, lang, m["body"], m["why"]))
    return blocks


def shell_script(block: Block) -> str:
    """The commands of a shell block; in a ``console`` block, only the ``$ `` lines are commands."""
    if block.lang != "console":
        return block.body
    return "\n".join(ln[2:] for ln in block.body.splitlines() if ln.startswith("$ "))


def test_blocks_are_found_and_parsed() -> None:
    text = (
        "intro\n```python\nx = 1\n```\n<!-- readme-test: skip (needs the network) -->\n```bash\npip install x\n```\n"
        "```console\n$ echo hi\nhi\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (2, "python", None),
        (6, "bash", "needs the network"),
        (9, "console", None),
    ]
    assert shell_script(blocks[2]) == "echo hi"
    with pytest.raises(ValueError, match="line 1"):
        readme_blocks("```\nuntagged\n```\n")


def test_readme_is_short_and_skips_little() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES
    blocks = readme_blocks(text)
    skipped = [b for b in blocks if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [b.line for b in skipped]
    assert sum(b.lang in PYTHON for b in blocks if not b.skip) >= 2
    assert sum(b.lang in SHELL for b in blocks if not b.skip) >= 2
    # every fence was matched: none is left unpaired or hidden inside another
    assert text.count("\n```") == 2 * len(blocks)


@pytest.fixture()
def readme_env(tmp_path: Path) -> dict[str, str]:
    """An environment where ``icl-retriever`` is this checkout's CLI (as a pip install's console script is)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "icl-retriever"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m icl_retriever.cli "$@"\n')
    script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_readme_blocks_run(
    tmp_path: Path, readme_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, default_index: Path
) -> None:
    # default_index: the session's build of the default pool has already exported the ONNX copies of both
    # models into the session cache, which the README's builds and CLI processes then reuse.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    ran = 0
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.skip or block.lang in NOT_CODE:
            continue
        where = f"README.md line {block.line}"
        if block.lang in PYTHON:
            exec(compile(block.body, where, "exec"), namespace)  # noqa: S102 - the README's own code
        else:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", shell_script(block)],
                cwd=work,
                env=readme_env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip(), f"{where} printed nothing"
        ran += 1
    assert ran >= 4
