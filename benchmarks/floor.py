"""What a cosine floor does when the pool may hold no demo of the query's task: ``min_score="auto"``
(the model's calibrated floor) against fixed cosines and no floor.

For every labelled instruction of each file, the query's whole task is removed from the pool for half the
queries (seeded): the right answer is then "no demo". For the other half only the query (and demos with its
exact text) is removed. Per floor it prints how often nothing comes back when the task is absent, how often a
same-task top-1 demo is kept when it is present, and the precision of the kept top-1 demos. The last row of a
file is the floor chosen in hindsight on that file's own outcomes (the lowest cosine whose kept demos reach the
calibration's target precision there): what no calibration elsewhere can beat at that precision.

    python -m benchmarks.floor                       # sni_dev (category labels) and eft_test, default model
    python -m benchmarks.floor --files a.json --label-field task --model runs/my-model --fixed 0.5 0.6
    python -m benchmarks.floor --relative --files ../shared/data/sni/sni_dev.json ../shared/data/ieb/eft_test.json \
        ../shared/data/ieb/eft_train_silver.json --max-queries 4000   # raw cosine against background-relative scores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from icl_retriever import PIEEncoder
from icl_retriever.calibration import DEFAULT_PRECISION, choose_floor, floor_outcomes
from icl_retriever.training import load_task_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = [SHARED / "sni" / "sni_dev.json", SHARED / "ieb" / "eft_test.json"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=Path, nargs="+", default=FILES, help="labelled files (IEB format, or pools)")
    ap.add_argument("--label-field", default=None, help="metadata field of the labels, for demo pools")
    ap.add_argument("--model", default=None, help="encoder (default: the embedded default)")
    ap.add_argument("--fixed", type=float, nargs="+", default=[0.5, 0.6, 0.7], help="fixed cosines to compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relative", action="store_true",
                    help="instead: ROC AUC of the raw top-1 cosine against scores relative to the query's background")
    ap.add_argument("--max-queries", type=int, default=None, help="with --relative: a seeded sample of each file")
    args = ap.parse_args(argv)
    encoder = PIEEncoder(args.model)
    if args.relative:
        relative_scores(encoder, args)
        return
    auto = encoder.calibrated_floor()
    floors: list[tuple[str, float | None]] = [("none", None)] + [(f"fixed {f:g}", f) for f in args.fixed]
    floors.append((f"auto ({auto:.3f})", auto))
    print("| file | queries | floor | nothing returned, task absent | same-task demo kept, task present | precision of kept |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        start = time.perf_counter()
        tasks = load_task_set(path, label_field=args.label_field)
        pairs = [(text, task) for task, texts in tasks.instructions.items() for text in texts]
        texts, labels = [t for t, _ in pairs], [label for _, label in pairs]
        outcomes = floor_outcomes(encoder.encode(texts, show_progress_bar=False), labels, texts, seed=args.seed)
        try:
            hindsight: float | None = choose_floor(outcomes, DEFAULT_PRECISION)[0]
        except ValueError:  # no cosine reaches the precision on this file
            hindsight = None
        rows = floors if hindsight is None else [*floors, (f"hindsight ({hindsight:.3f})", hindsight)]
        for name, floor in rows:
            r = outcomes.rates(floor)
            print(f"| {path.name} | {len(texts)} | {name} | {r['empty_when_absent']:.3f} | {r['kept_when_present']:.3f} "
                  f"| {r['precision']:.3f} |")
        if hindsight is None:
            print(f"| {path.name} | {len(texts)} | hindsight: no floor reaches precision {DEFAULT_PRECISION:g} | | | |")
        print(f"<!-- {path.name}: {time.perf_counter() - start:.0f} s -->")


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the chance that a positive scores above a negative (ties count half)."""
    ranks = np.empty(len(score))
    order = np.argsort(score, kind="stable")
    ranks[order] = np.arange(1, len(score) + 1)
    for value in np.unique(score):  # average the ranks of ties
        tied = score == value
        ranks[tied] = ranks[tied].mean()
    p, n = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def relative_scores(encoder: PIEEncoder, args: argparse.Namespace) -> None:
    """Could a floor relative to the query's background beat the raw cosine? The same protocol as the floor
    (the query's task removed for half the queries); per file the ROC AUC of each score for "the top-1 demo
    has the query's task"."""
    print("| file | queries | raw top-1 cosine | minus mean of ranks 11-50 | minus pool mean | z-score in the pool |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        tasks = load_task_set(path, label_field=args.label_field)
        pairs = [(text, task) for task, texts in tasks.instructions.items() for text in texts]
        if args.max_queries and len(pairs) > args.max_queries:
            keep = np.random.default_rng(args.seed + 1).permutation(len(pairs))[: args.max_queries]
            pairs = [pairs[i] for i in keep]
        texts, labels = [t for t, _ in pairs], np.asarray([label for _, label in pairs], dtype=object)
        keys = np.asarray([t.strip() for t in texts], dtype=object)
        vectors = encoder.encode(texts, show_progress_bar=False)
        n = len(texts)
        absent = np.zeros(n, dtype=bool)
        absent[np.random.default_rng(args.seed).permutation(n)[: n // 2]] = True
        scores = np.zeros((n, 4))
        correct = np.zeros(n, dtype=bool)
        for j in range(n):
            row = vectors @ vectors[j]
            visible = ~((labels == labels[j]) if absent[j] else (keys == keys[j]))
            pool = row[visible]
            ranked = np.sort(pool)[::-1]
            best = np.flatnonzero(visible)[int(np.argmax(pool))]
            correct[j] = labels[best] == labels[j]
            scores[j] = (ranked[0], ranked[0] - ranked[10:50].mean(), ranked[0] - pool.mean(),
                         (ranked[0] - pool.mean()) / pool.std())
        aucs = " | ".join(f"{_auc(scores[:, i], correct):.3f}" for i in range(4))
        print(f"| {path.name} | {n} | {aucs} |")


if __name__ == "__main__":
    main()
