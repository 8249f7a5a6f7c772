"""Does ``rerank="task_then_topic"`` return same-task demos that are also closer in content?

For every demo of a pool (leave-one-out: the demo itself is filtered out by id), the query is its
instruction + input, and we compare plain PIE top-k with ``rerank="task_then_topic"`` top-k:

- same-task@k: share of the k returned demos whose task label is the query's;
- topic cos: mean cosine, in the base model's plain embedding (the index's topic vectors), between the
  query's instruction + input and the returned same-task demos' instruction + input (averaged per query
  over the queries that got at least one same-task demo).

Pools: the default pool (examples/demos.jsonl, 385 demos of 77 tasks) and IEB's eft_test
(../shared/data/ieb/eft_test.json, 3291 instructions of 145 tasks; its ``input`` field repeats the
instruction, which is stripped so the demo's input is only what follows it).

Run: python -m benchmarks.rerank_quality [--ks 1 2 4] [--margins 0.03 0.05 0.1] [--no-eft]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from icl_retriever import Demo, PIEEncoder, Retriever
from icl_retriever.topic import topic_text
from icl_retriever.store import all_vectors

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = ROOT / "examples" / "demos.jsonl"
EFT_TEST = ROOT.parent / "shared" / "data" / "ieb" / "eft_test.json"


def eft_demos(path: Path) -> list[Demo]:
    data = json.loads(path.read_text(encoding="utf-8"))
    demos = []
    for label, group in data.items():
        for i, sample in enumerate(group["samples"]):
            instruction = sample["instruction"].strip()
            text = (sample.get("input") or "").strip()
            rest = text[len(instruction) :].strip() if text.startswith(instruction) else text
            demos.append(
                Demo(id=f"{label}#{i}", instruction=instruction, input=rest, output=sample.get("output", ""),
                     metadata={"task": label})
            )
    return demos


def evaluate(r: Retriever, ks: list[int], margins: list[float]) -> list[tuple[str, int, float, float]]:
    demos = r.demos
    tasks = np.array([d.metadata["task"] for d in demos])
    row_of = {d.id: i for i, d in enumerate(demos)}
    topic = all_vectors(r.topic_index)
    queries = [topic_text(d) for d in demos]
    kmax = max(ks)
    # one batch each for the PIE and topic embeddings of all queries; later calls hit the LRU cache
    r.get_demos_batch(queries, k=1, rerank="task_then_topic")
    methods: list[tuple[str, dict]] = [("plain PIE", {"rerank": None})] + [
        (f"task_then_topic (margin {m:g})", {"rerank": "task_then_topic", "rerank_margin": m}) for m in margins
    ]
    rows = []
    for name, controls in methods:
        same_at = {k: [] for k in ks}
        cos_at = {k: [] for k in ks}
        for i, (query, demo) in enumerate(zip(queries, demos, strict=True)):
            got = r.get_demos(query, k=kmax, filter=lambda d, own=demo.id: d.id != own, **controls)
            got_rows = np.array([row_of[d.id] for d in got])
            for k in ks:
                sel = got_rows[:k]
                same = tasks[sel] == tasks[i]
                same_at[k].append(float(same.mean()))
                if same.any():
                    cos_at[k].append(float((topic[sel[same]] @ topic[i]).mean()))
        for k in ks:
            rows.append((name, k, float(np.mean(same_at[k])), float(np.mean(cos_at[k]))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.03, 0.05, 0.1])
    parser.add_argument("--no-eft", action="store_true", help="only the default pool")
    args = parser.parse_args()
    encoder = PIEEncoder()
    pools: list[tuple[str, object]] = [("default pool (385)", DEFAULT_POOL)]
    if not args.no_eft and EFT_TEST.is_file():
        pools.append((f"eft_test ({len(eft_demos(EFT_TEST))})", eft_demos(EFT_TEST)))
    print("| pool | k | method | same-task@k | topic cos of same-task demos |")
    print("|---|---|---|---|---|")
    for label, pool in pools:
        start = time.perf_counter()
        r = Retriever.from_demos(pool, encoder=encoder, cache_size=100_000)  # type: ignore[arg-type]
        results = evaluate(r, args.ks, args.margins)
        for k in args.ks:
            for name, kk, same, cos in results:
                if kk == k:
                    print(f"| {label} | {k} | {name} | {same:.3f} | {cos:.3f} |", flush=True)
        print(f"<!-- {label}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
