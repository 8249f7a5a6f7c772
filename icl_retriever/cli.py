"""Command-line interface: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from icl_retriever._version import __version__
from icl_retriever.errors import ICLRetrieverError


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd_build(args: argparse.Namespace) -> int:
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.index_store import check_target
    from icl_retriever.records import load_pool
    from icl_retriever.build import build_index

    check_target(Path(args.out), force=args.force)
    demos = load_pool(args.pool)  # validate everything before loading a model
    encoder = PIEEncoder(args.model)
    start = time.perf_counter()
    retriever = build_index(demos, args.out, encoder=encoder, batch_size=args.batch_size, force=args.force,
                            show_progress_bar=True)
    seconds = time.perf_counter() - start
    tasks = {d.metadata.get("task") for d in demos} - {None}
    print(
        f"Indexed {len(retriever)} demos"
        + (f" ({len(tasks)} tasks)" if tasks else "")
        + f" into {args.out} in {seconds:.1f} s ({len(retriever) / seconds:.0f} demos/s); "
        f"dim {encoder.dim}, model {encoder.config.model}, pooling {encoder.config.pooling}"
    )
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from icl_retriever.retriever import Retriever

    retriever = Retriever.from_index(args.index, verify=not args.no_verify)
    demos = retriever.get_demos(args.text, k=args.k)
    if args.json:
        print(json.dumps([d.model_dump() for d in demos], ensure_ascii=False, indent=2))
        return 0
    for rank, demo in enumerate(demos, start=1):
        task = demo.metadata.get("task")
        print(f"{rank}. [{demo.score:.3f}] {_shorten(demo.instruction)}" + (f"   ({task})" if task else ""))
        if demo.input:
            print(f"   input:  {_shorten(demo.input)}")
        if demo.output:
            print(f"   output: {_shorten(demo.output)}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from icl_retriever.records import load_pool
    from icl_retriever.retriever import Retriever

    demos = load_pool(args.pool)  # validate everything before loading a model
    retriever = Retriever.from_index(args.index)
    ids = retriever.add(demos, upsert=args.upsert, batch_size=args.batch_size, persist=True)
    print(f"Added {len(ids)} demos to {args.index}; it now holds {len(retriever)}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from icl_retriever.retriever import Retriever

    retriever = Retriever.from_index(args.index)
    removed = retriever.remove(args.ids, persist=True)
    missing = sorted(set(args.ids) - set(removed))
    print(f"Removed {len(removed)} demos from {args.index}; it now holds {len(retriever)}")
    if missing:
        print(f"icl-retriever: warning: not in the index: {', '.join(missing)}", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from icl_retriever.index_store import load_manifest

    manifest = load_manifest(args.index)
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    enc = manifest.encoder
    rows = [
        ("index", str(args.index)),
        ("demos", str(manifest.count)),
        ("dim", str(manifest.dim)),
        ("index type", f"{manifest.index_type} ({manifest.metric})"),
        ("model", enc.model),
        ("pooling", enc.pooling),
        ("max length", str(enc.max_length)),
        ("template", json.dumps(enc.template)),
        ("fingerprint", manifest.fingerprint),
        ("created", manifest.created.isoformat(timespec="seconds")),
        ("updated", f"{manifest.updated.isoformat(timespec='seconds')} (generation {manifest.generation})"),
        ("format", f"{manifest.format_version} (library {manifest.library_version})"),
    ]
    rows += [(f"{role} file", f"{e.name}, {e.size} bytes, sha256 {e.sha256[:16]}…") for role, e in manifest.files.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="icl-retriever", description="Pick few-shot demonstrations by task (PIE embeddings + FAISS)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="embed a pool of demos into an index directory")
    p.add_argument("pool", help="pool file: JSONL, JSON list of records, or IEB format")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--model", default=None, help="model directory or Hugging Face id (default: the embedded PIE model)")
    p.add_argument("--batch-size", type=int, default=32, help="instructions per forward pass (default 32)")
    p.add_argument("--force", action="store_true", help="replace an existing index at --out")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("query", help="show the demos an index returns for a request")
    p.add_argument("index", help="index directory")
    p.add_argument("text", help="the request / instruction")
    p.add_argument("-k", type=int, default=4, help="how many demos (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("add", help="embed and add demos to an existing index (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("pool", help="pool file with the demos to add")
    p.add_argument("--upsert", action="store_true", help="replace demos whose id already exists")
    p.add_argument("--batch-size", type=int, default=32, help="instructions per forward pass (default 32)")
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("remove", help="remove demos from an index by id (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("--ids", nargs="+", required=True, help="ids of the demos to remove")
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("info", help="describe an index directory")
    p.add_argument("index", help="index directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icl-retriever`` command; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ICLRetrieverError as exc:
        print(f"icl-retriever: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad arguments caught by the library (k < 1, empty query, ...)
        print(f"icl-retriever: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, full disk, ...: name the file, skip the traceback
        print(f"icl-retriever: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icl-retriever: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
