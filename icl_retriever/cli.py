"""Command-line interface: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from typing import Any, Literal

from pydantic_core import PydanticUndefined

from icl_retriever._version import __version__
from icl_retriever.errors import ICLRetrieverError
from icl_retriever.records import Demo, check_text

#: What a terminal would act on instead of showing: C0 / C1 controls (ANSI escapes start with one),
#: bidirectional overrides, and lone surrogates (which cannot even be encoded).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _printable(text: object) -> str:
    """``text`` safe for a terminal: each control character shown as its escape (``\\x1b``), as ``--json`` does."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return _printable(text if len(text) <= width else text[: width - 1] + "…")


def _cmd_build(args: argparse.Namespace) -> int:
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.store import check_target
    from icl_retriever.records import load_pool
    from icl_retriever.build import build_index, check_build_params

    check_build_params(  # before the pool is read or a model loaded
        args.index_type, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search,
        nlist=args.nlist, nprobe=args.nprobe, batch_size=args.batch_size, chunk_size=args.chunk_size,
    )
    check_target(Path(args.out), force=args.force)
    demos = load_pool(args.pool)  # validate everything before loading a model
    encoder = PIEEncoder(args.model, quantize=args.quantize, runtime=args.runtime)
    start = time.perf_counter()
    try:
        retriever = build_index(
            demos, args.out, encoder=encoder, index_type=args.index_type, hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction, ef_search=args.ef_search, nlist=args.nlist, nprobe=args.nprobe,
            batch_size=args.batch_size, chunk_size=args.chunk_size, force=args.force, resume=not args.no_resume,
            show_progress_bar=True, topic=not args.no_topic,
        )
    except KeyboardInterrupt:
        print("icl-retriever: interrupted; finished chunks are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    tasks = {d.metadata.get("task") for d in demos} - {None}
    manifest = retriever.manifest
    assert manifest is not None
    if args.json:
        _print_json({"index": str(args.out), "demos": len(retriever), "tasks": len(tasks), "seconds": round(seconds, 3),
                     "runtime": encoder.runtime, "manifest": manifest.model_dump(mode="json")})
        return 0
    params = ", ".join(f"{k} {v}" for k, v in manifest.index_params.model_dump(exclude_none=True).items())
    print(
        f"Indexed {len(retriever)} demos"
        + (f" ({len(tasks)} tasks)" if tasks else "")
        + f" into {args.out} in {seconds:.1f} s ({len(retriever) / seconds:.0f} demos/s); "
        f"dim {encoder.dim}, model {encoder.config.model}, pooling {encoder.config.pooling}"
        + (", int8" if encoder.config.quantize else "")
        + f"; index {manifest.index_type}"
        + (f" ({params})" if params else "")
        + (f", recall@10 {manifest.recall_at_10:.3f} vs exact search" if manifest.recall_at_10 is not None else "")
    )
    return 0


def _filter_value(text: str) -> object:
    """A JSON literal (number, true, false, null) as itself; anything else as a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if not isinstance(value, (dict, list, str)) else text


def _parse_filters(items: Sequence[str] | None) -> dict[str, object] | None:
    """``KEY=VALUE`` (equality) / ``KEY=V1,V2`` (any of) / ``KEY=[JSON list]`` flags as a metadata filter."""
    if not items:
        return None
    spec: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw:
            raise ValueError(f"--filter {item!r}: expected KEY=VALUE or KEY=VALUE1,VALUE2")
        if key in spec:
            raise ValueError(f"--filter: {key!r} given twice; list its values once: {key}=V1,V2")
        if raw.startswith("["):
            try:
                values = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"--filter {item!r}: not a JSON list ({exc})") from None
            spec[key] = values if isinstance(values, list) else [values]
        elif "," in raw:
            spec[key] = [_filter_value(v.strip()) for v in raw.split(",") if v.strip()]
        else:
            spec[key] = _filter_value(raw.strip())
    return spec


def _cmd_query(args: argparse.Namespace) -> int:
    from icl_retriever.search.controls import SearchControls
    from icl_retriever.retriever import Retriever

    controls = dict(
        diversity=args.diversity,
        fetch_k=args.fetch_k,
        filter=_parse_filters(args.filter),
        dedup=args.dedup,
        exclude_query=args.exclude_query,
        **({"rerank": None if args.rerank == "none" else args.rerank} if args.rerank is not None else {}),
        max_tokens=args.max_tokens,
        tokenizer=args.tokenizer,
        demo_format=args.demo_format.replace("\\n", "\n").replace("\\t", "\t") if args.demo_format else None,
        **({"rerank_margin": args.rerank_margin} if args.rerank_margin is not None else {}),
        **({"rerank_weight": args.rerank_weight} if args.rerank_weight is not None else {}),
        min_score=_min_score(args.min_score),
    )
    SearchControls.parse(k=args.k, **controls)  # a bad flag fails before the model loads
    retriever = Retriever.from_index(args.index, model=args.model, verify=not args.no_verify, runtime=args.runtime)
    demos = retriever.get_demos(args.text, k=args.k, **controls)
    if args.json:
        _print_json([d.model_dump() for d in demos])
        return 0
    if not demos and args.min_score is not None:
        print(f"No demo reached --min-score {args.min_score}: none is confidently of this request's task")
    _print_demos(demos)
    return 0


def _print_json(data: Any) -> None:
    """A report as JSON on stdout (``--json``)."""
    print(json.dumps(data, ensure_ascii=False, indent=2))


def _min_score(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--min-score must be a cosine or 'auto', got {text!r}") from None


def _print_demos(demos: Sequence[Demo]) -> None:
    for rank, demo in enumerate(demos, start=1):
        task = demo.metadata.get("task")
        print(f"{rank}. [{demo.score:.3f}] {_shorten(demo.instruction)}" + (f"   ({_shorten(str(task))})" if task else ""))
        if demo.input:
            print(f"   input:  {_shorten(demo.input)}")
        if demo.output:
            print(f"   output: {_shorten(demo.output)}")


#: Requests ``icl-retriever demo`` answers when none are given (those of ``make demo``).
DEMO_QUERIES = (
    "Translate 'good night' into German.",
    "Write a limerick about a cat who loves lasagna.",
    "Write a SQL query that lists customers from Spain.",
    "Is this review positive or negative? 'The battery died after two days.'",
)


def demo_cache_dir() -> Path:
    """Where ``icl-retriever demo`` keeps its index: the user cache (:func:`~icl_retriever.cache.cache_dir`)."""
    from icl_retriever.cache import cache_dir

    return cache_dir()


def _cmd_demo(args: argparse.Namespace) -> int:
    import hashlib

    from icl_retriever.build import build_index
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.errors import IndexFormatError
    from icl_retriever.records import default_pool_path
    from icl_retriever.retriever import Retriever

    pool = default_pool_path()
    digest = hashlib.sha256(pool.read_bytes()).hexdigest()[:12]
    cached = args.index is None
    out = demo_cache_dir() / f"default-pool-{__version__}-{digest}" if cached else Path(args.index)
    retriever = None
    if out.exists() and not args.rebuild:
        try:
            retriever = Retriever.from_index(out, runtime=args.runtime)
        except IndexFormatError as exc:  # also EncoderMismatchError: made by another model
            if not cached:
                raise
            print(f"icl-retriever: the cached demo index is unusable ({_printable(exc)}); rebuilding", file=sys.stderr)
    if retriever is None:
        print(f"Building the packaged pool ({pool.name}, shipped with the package) into {out}", file=sys.stderr)
        encoder = PIEEncoder(runtime=args.runtime)
        retriever = build_index(pool, out, encoder=encoder, force=out.exists(), show_progress_bar=True)
    if args.json:
        _print_json({"index": str(out), "demos": len(retriever), "answers": [
            {"query": text, "demos": [d.model_dump() for d in retriever.get_demos(text, k=args.k)]}
            for text in args.queries or DEMO_QUERIES
        ]})
        return 0
    print(f"Index {out}: {len(retriever)} demos")
    for text in args.queries or DEMO_QUERIES:
        print(f"\n> {_shorten(text)}")
        _print_demos(retriever.get_demos(text, k=args.k))
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from icl_retriever.records import load_pool
    from icl_retriever.retriever import Retriever

    demos = load_pool(args.pool)  # validate everything before loading a model
    retriever = Retriever.from_index(args.index, model=args.model, runtime=args.runtime)
    ids = retriever.add(demos, upsert=args.upsert, batch_size=args.batch_size, persist=True)
    if args.json:
        _print_json({"index": str(args.index), "added": ids, "demos": len(retriever)})
        return 0
    print(f"Added {len(ids)} demos to {args.index}; it now holds {len(retriever)}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from icl_retriever.retriever import Retriever

    retriever = Retriever.from_index(args.index, model=args.model)
    removed = retriever.remove(args.ids, persist=True)
    missing = sorted(set(args.ids) - set(removed))
    if args.json:
        _print_json({"index": str(args.index), "removed": list(removed), "not_found": missing, "demos": len(retriever)})
        return 0
    print(f"Removed {len(removed)} demos from {args.index}; it now holds {len(retriever)}")
    if missing:
        print(f"icl-retriever: warning: not in the index: {_printable(', '.join(missing))}", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from icl_retriever.store import load_manifest

    manifest = load_manifest(args.index)
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    enc = manifest.encoder
    rows = [
        ("index", str(args.index)),
        ("demos", str(manifest.count)),
        ("dim", str(manifest.dim)),
        ("index type", f"{manifest.index_type} ({manifest.metric})"
         + "".join(f", {k} {v}" for k, v in manifest.index_params.model_dump(exclude_none=True).items())
         + (f", recall@10 {manifest.recall_at_10:.3f}" if manifest.recall_at_10 is not None else "")),
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
        print(f"{key:<{width}}  {_printable(value)}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from icl_retriever.train_config import TrainConfig
    from icl_retriever.training import train

    fields = TrainConfig.model_fields
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    config = TrainConfig(**given)
    out = train(config, show_progress_bar=True)
    card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
    if args.json:
        _print_json({"model": str(out), "training_card": card})
        return 0
    val = card.get("validation") or {}
    print(
        f"Trained {card['steps_done']} steps in {card['wall_time_s']:.0f} s "
        f"({card['seconds_per_step']:.2f} s/step) -> {out}; held-out validation: "
        + (", ".join(f"{k} {v:.4f}" for k, v in val.items() if k not in ("step", "tiebreak")) or "none")
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.evaluation import evaluate

    if args.ict is None and args.iis is None and args.cross_group is None and args.pool is None:
        raise ValueError("give at least one of --ict, --iis, --cross-group, --pool")
    encoder = PIEEncoder(args.model, template=args.template, pooling=args.pooling, runtime=args.runtime,
                         quantize=args.quantize)
    report = evaluate(
        encoder, args.ict, args.iis, cross_group_path=args.cross_group, pool_path=args.pool,
        label_field=args.label_field, batch_size=args.batch_size, show_progress_bar=not args.json,
    )
    print(report.model_dump_json(indent=2) if args.json else report.table())
    return 0


#: Flags of ``train`` whose spelling is not the TrainConfig field's (``--val-file FILE`` repeats).
_TRAIN_FLAG_NAMES = {"output_dir": "--out", "val_files": "--val-file"}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, generated from its type, default and description, so
    every setting is reachable and none drifts from the config (a test checks it)."""
    import types
    import typing

    from icl_retriever.train_config import TrainConfig

    for name, field in TrainConfig.model_fields.items():
        if name == "train_files":
            continue
        flag = _TRAIN_FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").replace("%", "%%")
        if default not in (None, [], PydanticUndefined):
            help_text += f" (default {default})" if help_text else f"default {default}"
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        kind = annotation
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text or None}
        if name == "output_dir":
            kw.update(type=Path, required=True, metavar="DIR")
        elif name == "val_files":
            kw.update(type=Path, action="append", metavar="FILE")
        elif name == "mix":
            kw.update(type=_floats, metavar="W1,W2,...")
        elif kind is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is Literal:
            kw.update(choices=list(typing.get_args(kind)))
        elif kind in (int, float, str, Path):
            kw.update(type=kind)
        else:  # a field of a type this generator does not know: fail loudly, not silently drop it
            raise TypeError(f"TrainConfig.{name}: no CLI flag for type {field.annotation!r}")
        p.add_argument(flag, **kw)


_RUNTIME_HELP = (
    "where vectors are computed: auto (default): ONNX Runtime on CPU, exported from the model once and cached "
    "(float32, the same vectors within 1e-4; later starts load neither torch nor transformers), torch elsewhere; "
    "torch; onnx"
)


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", action="store_true",
                   help="CPU only: dynamic int8 encoder (faster, slightly different vectors: an index built with it "
                        "is queried with it, which it loads by itself)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto", help=_RUNTIME_HELP)


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
    p.add_argument("--no-topic", action="store_true",
                   help="skip the topic vectors (plain embeddings of instruction + input) that --rerank "
                        "task_then_topic needs; halves the embedding work")
    p.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivf"], default="auto",
                   help="flat: exact; hnsw / ivf: approximate, for large pools (default auto: flat below 200,000 "
                        "demos, hnsw above)")
    p.add_argument("--hnsw-m", type=int, default=None, metavar="M", help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=None, metavar="N", help="HNSW build breadth (default 128)")
    p.add_argument("--ef-search", type=int, default=None, metavar="N",
                   help="HNSW search breadth (default: tuned from 64 until recall@10 >= 0.95 on a sample)")
    p.add_argument("--nlist", type=int, default=None, metavar="N", help="IVF clusters (default about sqrt(demos))")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="IVF clusters searched (default: tuned from 32 until recall@10 >= 0.95)")
    p.add_argument("--chunk-size", type=int, default=10_000, metavar="N",
                   help="instructions embedded and checkpointed at a time; an interrupted build resumes from the "
                        "last finished chunk (default 10000)")
    p.add_argument("--no-resume", action="store_true", help="embed everything again, ignoring finished chunks")
    _add_quantize(p)
    _add_runtime(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("query", help="show the demos an index returns for a request")
    p.add_argument("index", help="index directory")
    p.add_argument("text", help="the request / instruction")
    p.add_argument("-k", type=int, default=4, help="how many demos (default 4)")
    p.add_argument("--diversity", type=float, default=0.0, metavar="D",
                   help="0..1: maximal marginal relevance over the --fetch-k best (0, the default: plain ranking)")
    p.add_argument("--fetch-k", type=int, default=None, metavar="N",
                   help="candidates examined by --diversity/--rerank/--dedup/--max-tokens (default max(20, 4k))")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE[,VALUE...]",
                   help="only demos whose metadata KEY equals VALUE (or one of the VALUEs); repeat for more keys "
                        "(all must match); numbers/true/false are JSON, other values strings")
    p.add_argument("--dedup", nargs="?", type=float, const=True, default=None, metavar="COSINE",
                   help="drop near-duplicate demos (cosine above COSINE, default 0.95)")
    p.add_argument("--exclude-query", action="store_true", help="drop demos whose instruction is the query itself")
    p.add_argument("--rerank", choices=["auto", "hybrid", "task_then_topic", "none"], default=None,
                   help="auto (default): the measured default ranking when the index has topic vectors; none: task "
                        "similarity only; hybrid: a weighted sum of task and content similarity; task_then_topic: "
                        "among same-task demos, those closest in content first")
    p.add_argument("--rerank-margin", type=float, default=None, metavar="M",
                   help="PIE cosine margin that counts as the same task for --rerank task_then_topic (default 0.1)")
    p.add_argument("--rerank-weight", type=float, default=None, metavar="W",
                   help="PIE (task) weight of --rerank hybrid, the content weight is 1 - W (default 0.5)")
    p.add_argument("--min-score", default=None, metavar="COSINE|auto",
                   help="drop demos below this PIE cosine (fewer than k, or none, may come back); auto: the "
                        "model's calibrated floor (precision 0.9 that a kept demo has the query's task)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="pack the best demos whose formatted length fits N tokens in total (never truncates one)")
    p.add_argument("--tokenizer", default=None, metavar="NAME",
                   help="tokenizer for --max-tokens: a Hugging Face model name or directory (default: the encoder's)")
    p.add_argument("--demo-format", default=None, metavar="TEMPLATE",
                   help=r"how a demo is formatted for --max-tokens, e.g. 'Q: {instruction}\nA: {output}' "
                        "(default: instruction, input, output on separate lines)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files")
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is the embedded default or inside the index)")
    _add_runtime(p)
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("add", help="embed and add demos to an existing index (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("pool", help="pool file with the demos to add")
    p.add_argument("--upsert", action="store_true", help="replace demos whose id already exists")
    p.add_argument("--batch-size", type=int, default=32, help="instructions per forward pass (default 32)")
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is the embedded default or inside the index)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_runtime(p)
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("remove", help="remove demos from an index by id (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("--ids", nargs="+", required=True, help="ids of the demos to remove")
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is the embedded default or inside the index)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("train", help="PIE contrastive fine-tuning on task-labelled instructions")
    p.add_argument("train_files", type=Path, nargs="+", metavar="TRAIN_FILE",
                   help="IEB-format JSON or JSONL with instruction + task (or, with --label-field, demo pools); "
                        "several files are mixed in every batch")
    _add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="ICT clustering, IIS similarity, cross-group and pool retrieval P@k of a model")
    p.add_argument("--model", default=None, help="model directory, Hugging Face id, or the default")
    p.add_argument("--ict", type=Path, default=None, help="IEB-format file (e.g. eft_test.json)")
    p.add_argument("--iis", type=Path, default=None, help="pair file (e.g. intention_similarity_test.json)")
    p.add_argument("--cross-group", type=Path, default=None, metavar="FILE",
                   help="IEB-format file whose samples carry a 'dataset' (e.g. sni_dev.json): P@1 of the nearest "
                        "neighbour from another dataset")
    p.add_argument("--pool", type=Path, default=None, metavar="FILE",
                   help="demo pool (e.g. examples/demos.jsonl): leave-one-out P@k by --label-field")
    p.add_argument("--label-field", default="task", metavar="FIELD", help="metadata field holding a pool demo's task")
    p.add_argument("--template", default=None, help="override the model's template")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quantize(p)
    _add_runtime(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="build the packaged demo pool (once, in a cache directory) and answer requests")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="requests to answer (default: four examples)")
    p.add_argument("-k", type=int, default=3, help="demos per request (default 3)")
    p.add_argument("--index", metavar="DIR",
                   help="index directory to build or reuse (default: a cache directory, $ICL_RETRIEVER_CACHE or "
                        "~/.cache/icl-retriever)")
    p.add_argument("--rebuild", action="store_true", help="build the index again even if it exists")
    _add_runtime(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_demo)

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
        for name, value in vars(args).items():  # the text rule, before any work: no surrogates, no stray bytes
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (str, Path)):
                    check_text(str(item), f"argument {name}")
        return int(args.func(args))
    except ICLRetrieverError as exc:
        print(f"icl-retriever: error: {_printable(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad arguments caught by the library (k < 1, empty query, ...)
        print(f"icl-retriever: error: {_printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, full disk, ...: name the file, skip the traceback
        print(f"icl-retriever: error: {_printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icl-retriever: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
