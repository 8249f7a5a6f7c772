"""What retrieved demonstrations do for a real causal LLM: gold-output NLL, same-task rate, accuracy.

For sampled queries of a pool (leave-one-out: a query never sees its own instruction text), each method
picks k demos, and a causal LM scores the gold output given "Instruction / Input / Output" prompts
(icl_retriever.downstream). Prints a markdown table; --json writes the full report with per-query rows.

Run from the repository root (the GGUF reference model needs `pip install -e ".[downstream]"`):

    python -m benchmarks.downstream --model gemma3-270m --max-queries 50 -k 1 2 4
    python -m benchmarks.downstream --model ./my-llm --pool eft_test.json --methods zero-shot,topic,pie
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from icl_retriever import PIEEncoder
from icl_retriever.downstream import DEFAULT_METHODS, DownstreamConfig, load_causal_lm, run_downstream
from icl_retriever.errors import ICLRetrieverError
from icl_retriever.topic import TopicEncoder, default_topic_encoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = ROOT / "examples" / "demos.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.downstream", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m", help="directory, hub id, .gguf file, gemma3-270m or pkg:PACKAGE")
    p.add_argument("--gguf-file", help="GGUF file inside --model (a directory or hub id)")
    p.add_argument("--pool", default=str(DEFAULT_POOL), help="demo pool (JSONL, JSON list or IEB)")
    p.add_argument("--queries", help="separate query file (default: queries drawn from the pool)")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; hybrid:W, mmr:D, pie_then_topic[:MARGIN]"
    )
    p.add_argument("-k", "--ks", type=int, nargs="+", default=[1, 2, 4], help="demos per prompt")
    p.add_argument("--max-queries", type=int, default=100, help="queries to sample (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reference", default=None, help="method for paired NLL differences (default: topic when run)")
    p.add_argument("--label-field", default="task", help="metadata field holding the task label")
    p.add_argument(
        "--option-score", choices=("total", "mean"), default="total", help="option log-likelihood for accuracy"
    )
    p.add_argument("--encoder", help="PIE encoder directory (default: the packaged default)")
    p.add_argument("--topic-vectors", choices=("contextual", "static"), default=None,
                   help="topic vectors of the rerankers (pie_then_topic, hybrid, default) as an index built with "
                        "--topic KIND would hold (default: what build_index gives the encoder)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(
    argv: list[str] | None = None,
    *,
    encoder: PIEEncoder | None = None,
    topic_encoder: PIEEncoder | None = None,
    content_encoder: TopicEncoder | None = None,
) -> int:
    """Run the benchmark; ``encoder`` / ``topic_encoder`` (the ``topic`` baseline's) / ``content_encoder``
    (the rerankers' topic vectors) replace the ones it would load (for tests and experiments)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        settings = {"reference": args.reference} if args.reference else {}
        config = DownstreamConfig.parse(
            methods=methods, ks=args.ks, max_queries=args.max_queries or None, seed=args.seed,
            max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size, label_field=args.label_field,
            option_score=args.option_score, **settings,
        )
        if encoder is None and args.encoder:
            encoder = PIEEncoder(args.encoder, device=args.device)
        if content_encoder is None and args.topic_vectors:
            content_encoder, _ = default_topic_encoder(encoder or PIEEncoder(device=args.device), args.topic_vectors)
        lm = load_causal_lm(args.model, gguf_file=args.gguf_file, device=args.device)
        report = run_downstream(
            lm, args.pool, queries=args.queries, config=config, encoder=encoder, topic_encoder=topic_encoder,
            content_encoder=content_encoder,
            show_progress_bar=not args.no_progress,
        )
    except (ICLRetrieverError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        args.json.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
