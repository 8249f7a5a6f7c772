"""What the command prints: demos for a terminal (control characters shown as escapes), and JSON reports."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from icl_retriever.records import Demo

#: What a terminal would act on instead of showing: C0 / C1 controls (ANSI escapes start with one),
#: bidirectional overrides, and lone surrogates (which cannot even be encoded).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object) -> str:
    """``text`` safe for a terminal: each control character shown as its escape (``\\x1b``), as ``--json`` does."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return printable(text if len(text) <= width else text[: width - 1] + "…")


def print_json(data: Any) -> None:
    """A report as JSON on stdout (``--json``)."""
    print(json.dumps(data, ensure_ascii=False, indent=2))


def print_demos(demos: Sequence[Demo]) -> None:
    for rank, demo in enumerate(demos, start=1):
        task = demo.metadata.get("task")
        print(f"{rank}. [{demo.score:.3f}] {shorten(demo.instruction)}" + (f"   ({shorten(str(task))})" if task else ""))
        if demo.input:
            print(f"   input:  {shorten(demo.input)}")
        if demo.output:
            print(f"   output: {shorten(demo.output)}")


#: Requests ``icl-retriever demo`` answers when none are given (those of ``make demo``).
