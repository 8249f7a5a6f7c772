"""Command-line interface: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from icl_retriever.cli.commands import DEMO_QUERIES, demo_cache_dir
from icl_retriever.cli.output import printable
from icl_retriever.cli.parser import build_parser
from icl_retriever.errors import ICLRetrieverError
from icl_retriever.records import check_text

__all__ = ["DEMO_QUERIES", "build_parser", "demo_cache_dir", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icl-retriever`` command; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        for name, value in vars(args).items():  # the text rule, before any work: no surrogates, no stray bytes
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (str, Path)):
                    check_text(str(item), f"argument {name}")
        return int(args.func(args))
    except ICLRetrieverError as exc:
        print(f"icl-retriever: error: {printable(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad arguments caught by the library (k < 1, empty query, ...)
        print(f"icl-retriever: error: {printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, full disk, ...: name the file, skip the traceback
        print(f"icl-retriever: error: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icl-retriever: interrupted", file=sys.stderr)
        return 130
