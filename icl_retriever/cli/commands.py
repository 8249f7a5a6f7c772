"""The commands: each turns parsed arguments into library calls and prints the result."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icl_retriever import presets
from icl_retriever.cli.output import print_demos, print_json, printable, shorten

if TYPE_CHECKING:
    from icl_retriever.encoder import PIEEncoder


def _ray_options(args: argparse.Namespace) -> Any:
    """The RayOptions of ``--engine ray`` and its flags (None for a local run, whose Ray flags are an error)."""
    from icl_retriever.ray_engine import RayOptions

    flags = {"address": args.address, "actors": args.actors, "gpus_per_actor": args.gpus_per_actor}
    if args.engine != "ray":
        if any(v is not None for v in flags.values()):
            raise ValueError("--address, --actors and --gpus-per-actor apply to --engine ray")
        return None
    return RayOptions(**{k: v for k, v in flags.items() if v is not None})


def cmd_build(args: argparse.Namespace) -> int:
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.store import build_lock, check_target
    from icl_retriever.records import load_pools
    from icl_retriever.build import build_index, check_build_params, index_params
    from icl_retriever.topic import check_topic_kind

    params = index_params(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search,
                          nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m)
    if args.engine == "ray" and (args.chunk_size is not None or args.no_resume or args.batch_size is not None):
        raise ValueError("--chunk-size, --no-resume and --batch-size apply to a local build; --engine ray batches "
                         "on its actors and keeps no checkpoints")
    chunk_size = 10_000 if args.chunk_size is None else args.chunk_size
    check_build_params(args.index_type, params, batch_size=args.batch_size, chunk_size=chunk_size)
    topic = check_topic_kind({"auto": True, "none": False}.get(args.topic, args.topic), args.model or "default")
    ray = _ray_options(args)
    out = Path(args.out)
    check_target(out, force=args.force)
    # a local build validates everything before loading a model; Ray validates in its read tasks
    demos = load_pools(args.pool) if args.engine == "local" else None
    if demos is not None:  # auto's index type is known now: a flag it would ignore is refused
        check_build_params(args.index_type, params, batch_size=args.batch_size, chunk_size=chunk_size,
                           count=len(demos))
    start = time.perf_counter()
    try:
        # held from here (build_index takes it again): another build into --out is refused before a model loads
        with build_lock(out, timeout=0):
            encoder = PIEEncoder(args.model, quantize=args.quantize, runtime=args.runtime)
            retriever = build_index(
                demos if demos is not None else args.pool, out, encoder=encoder, engine=args.engine, ray=ray,
                index_type=args.index_type, index=params, batch_size=args.batch_size, chunk_size=chunk_size,
                force=args.force, resume=not args.no_resume, show_progress_bar=True, topic=topic,
            )
    except KeyboardInterrupt:
        print("icl-retriever: interrupted; finished chunks are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    tasks = {d.metadata.get("task") for d in retriever.demos} - {None}
    manifest = retriever.manifest
    assert manifest is not None
    if args.json:
        print_json({"index": str(args.out), "demos": len(retriever), "tasks": len(tasks), "seconds": round(seconds, 3),
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


def cmd_query(args: argparse.Namespace) -> int:
    from icl_retriever.search.controls import SearchControls
    from icl_retriever.retriever import Retriever, check_queries

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
    if args.demo_format is not None and args.max_tokens is None:  # query prints demos whole: it would be ignored
        raise ValueError("--demo-format is only used with --max-tokens")
    SearchControls.parse(k=args.k, **controls)  # a bad flag fails before the model loads
    check_queries([args.text])
    retriever = Retriever.from_index(args.index, model=args.model, verify=not args.no_verify, runtime=args.runtime,
                                     mmap=args.mmap)
    demos = retriever.get_demos(args.text, k=args.k, **controls)
    if args.json:
        print_json([d.model_dump() for d in demos])
        return 0
    if not demos and args.min_score is not None:
        print(f"No demo reached --min-score {args.min_score}: none is confidently of this request's task")
    print_demos(demos)
    return 0


def _min_score(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--min-score must be a cosine or 'auto', got {text!r}") from None


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


def cmd_demo(args: argparse.Namespace) -> int:
    from icl_retriever.demo_cache import open_demo_index
    from icl_retriever.retriever import check_queries
    from icl_retriever.search.controls import SearchControls

    queries = args.queries or list(DEMO_QUERIES)
    SearchControls.parse(k=args.k)  # bad arguments fail before any model loads or index is built
    check_queries(queries)

    def tell(line: str) -> None:
        print(line if line[:1].isupper() else f"icl-retriever: {printable(line)}", file=sys.stderr)

    retriever = open_demo_index(args.index, model=args.model, rebuild=args.rebuild, runtime=args.runtime,
                                notify=tell)
    out = retriever.path
    if args.json:
        print_json({"index": str(out), "model": args.model, "demos": len(retriever), "answers": [
            {"query": text, "demos": [d.model_dump() for d in retriever.get_demos(text, k=args.k)]}
            for text in queries
        ]})
        return 0
    print(f"Index {out}: {len(retriever)} demos, model {args.model}")
    for text in queries:
        print(f"\n> {shorten(text)}")
        print_demos(retriever.get_demos(text, k=args.k))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from icl_retriever.embed import check_batch_size
    from icl_retriever.records import load_pool
    from icl_retriever.retriever import Retriever

    check_batch_size(args.batch_size)
    demos = load_pool(args.pool)  # validate everything before loading a model
    retriever = Retriever.from_index(args.index, model=args.model, runtime=args.runtime)
    ids = retriever.add(demos, upsert=args.upsert, batch_size=args.batch_size, persist=True)
    if args.json:
        print_json({"index": str(args.index), "added": ids, "demos": len(retriever)})
        return 0
    print(f"Added {len(ids)} demos to {args.index}; it now holds {len(retriever)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from icl_retriever.retriever import Retriever

    retriever = Retriever.from_index(args.index, model=args.model)
    removed = retriever.remove(args.ids, persist=True)
    missing = sorted(set(args.ids) - set(removed))
    if args.json:
        print_json({"index": str(args.index), "removed": list(removed), "not_found": missing, "demos": len(retriever)})
        return 0
    print(f"Removed {len(removed)} demos from {args.index}; it now holds {len(retriever)}")
    if missing:
        print(f"icl-retriever: warning: not in the index: {printable(', '.join(missing))}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
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
        ("model", enc.model + (f" (preset: {preset.description})" if (preset := presets.find(enc.model)) else "")),
        ("pooling", enc.pooling),
        ("max length", str(enc.max_length)),
        ("template", json.dumps(enc.template)),
        ("fingerprint", manifest.fingerprint),
        ("topic vectors", "none (task order only)" if manifest.topic is None else
         {"base_static": "static (IDF-weighted word pieces of", "base_model": "contextual (plain embedding of",
          "same_model_plain": "contextual (plain embedding of"}[manifest.topic.source] + f" {manifest.topic.encoder.model})"),
        ("created", manifest.created.isoformat(timespec="seconds")),
        ("updated", f"{manifest.updated.isoformat(timespec='seconds')} (generation {manifest.generation})"),
        ("format", f"{manifest.format_version} (library {manifest.library_version})"),
    ]
    rows += [(f"{role} file", f"{e.name}, {e.size} bytes, sha256 {e.sha256[:16]}…") for role, e in manifest.files.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {printable(value)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from icl_retriever.errors import first_validation_error
    from icl_retriever.serve.server import serve
    from icl_retriever.serve.settings import ServeSettings, flag_of

    fields = ServeSettings.model_fields
    try:
        settings = ServeSettings(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    except ValidationError as exc:
        field, _, msg = first_validation_error(exc, "settings")
        raise ValueError(f"{flag_of(field)}: {msg}") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    serve(args.index, host=args.host, port=args.port, token_env=args.token_env, settings=settings, model=args.model,
          runtime=args.runtime, mmap=args.mmap, access_log=args.access_log, log_level=args.log_level)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from icl_retriever.encoder import PIEEncoder
    from icl_retriever.selection import select_pool
    from icl_retriever.store import record_line, replace_file

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory, not a file")
    if out.exists() and not args.force:
        raise ValueError(f"--out {out}: exists; pass --force to replace it")
    ray = _ray_options(args)
    # the model loads only once select_pool has checked --n and the rest against the pool
    encoder = None if Path(args.source).is_dir() and args.model is None else (
        lambda: PIEEncoder(args.model, runtime=args.runtime))
    result = select_pool(
        args.source, args.n, method=args.method, label_field=args.label_field, per_task_cap=args.per_task_cap,
        encoder=encoder, batch_size=args.batch_size, seed=args.seed, show_progress_bar=True, engine=args.engine,
        ray=ray, runtime=args.runtime,
    )
    replace_file(out, [record_line(d) for d in result.demos])
    if args.json:
        print_json({**result.model_dump(exclude={"demos"}), "out": str(out)})
        return 0
    covered = (f"; {result.labels_covered} of {result.labels_in_pool} {args.label_field} labels covered"
               if result.labels_in_pool is not None else "")
    print(f"Selected {len(result.demos)} of {result.pool_size} instructions ({args.method}) into {out}"
          f" in {result.seconds:.1f} s{covered}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from icl_retriever.train_config import TrainConfig
    from icl_retriever.training import train

    fields = TrainConfig.model_fields
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    config = TrainConfig(**given)
    out = train(config, show_progress_bar=True)
    card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
    if args.json:
        print_json({"model": str(out), "training_card": card})
        return 0
    val = card.get("validation") or {}
    print(
        f"Trained {card['steps_done']} steps in {card['wall_time_s']:.0f} s "
        f"({card['seconds_per_step']:.2f} s/step) -> {out}; held-out validation: "
        + (", ".join(f"{k} {v:.4f}" for k, v in val.items() if k not in ("step", "tiebreak")) or "none")
    )
    return 0


def _eval_encoder(args: argparse.Namespace) -> PIEEncoder:
    """The encoder ``eval`` measures (or ranks demos with, for ``--downstream``)."""
    from icl_retriever.encoder import PIEEncoder

    return PIEEncoder(args.model, template=args.template, pooling=args.pooling, runtime=args.runtime,
                      quantize=args.quantize)


def cmd_eval(args: argparse.Namespace) -> int:
    from icl_retriever.evaluation import evaluate

    if args.downstream is not None:
        return _eval_downstream(args)
    ignored = [flag for dest, (flag, default) in args.downstream_only.items() if getattr(args, dest) != default]
    if ignored:
        raise ValueError(f"{', '.join(ignored)} apply to --downstream LLM")
    if args.ict is None and args.iis is None and args.cross_group is None and args.pool is None:
        raise ValueError("give at least one of --ict, --iis, --cross-group, --pool, --downstream")
    if args.label_field is not None and args.pool is None:
        raise ValueError("--label-field names the label of a --pool's demos; give --pool")

    report = evaluate(  # the encoder is loaded once every file is read and checked
        lambda: _eval_encoder(args), args.ict, args.iis, cross_group_path=args.cross_group, pool_path=args.pool,
        label_field=args.label_field or "task", batch_size=args.batch_size, show_progress_bar=not args.json,
    )
    print(report.model_dump_json(indent=2) if args.json else report.table())
    return 0


def _eval_downstream(args: argparse.Namespace) -> int:
    """``eval --downstream LLM``: the downstream benchmark on the user's pool and LLM (settings checked first)."""
    from icl_retriever.downstream import DownstreamConfig, load_causal_lm, run_downstream
    from icl_retriever.records import default_pool_path

    if args.ict is not None or args.iis is not None or args.cross_group is not None:
        raise ValueError("--downstream measures an LLM on --pool; run --ict / --iis / --cross-group separately")
    reference = {"reference": args.reference} if args.reference else {}
    config = DownstreamConfig.parse(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], ks=args.ks,
        max_queries=args.max_queries or None, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.llm_batch_size, label_field=args.label_field or "task", option_score=args.option_score,
        **reference,
    )
    encoder = _eval_encoder(args)
    lm = load_causal_lm(args.downstream, gguf_file=args.gguf_file, device=args.device)
    report = run_downstream(
        lm, args.pool or default_pool_path(), queries=args.queries, config=config, encoder=encoder,
        show_progress_bar=not args.json,
    )
    if args.report is not None:
        args.report.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(report.model_dump_json(indent=2) if args.json else report.summary())
    return 0
