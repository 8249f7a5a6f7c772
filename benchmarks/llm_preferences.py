"""Can a reranker learned from the LLM's own preferences beat the default ranking? (LLM-R / UDR style)

For sampled queries of a labelled pool with outputs (a training file: SNI train's positive examples by
default, never a test set), the causal LM scores the query's gold output with each of the ``--candidates``
best demos by PIE similarity as its single demo (k = 1), and without any demo. From those preferences:

* the NLL of the demo each ranking puts first (task order, ``task_then_topic`` margins, hybrid weights,
  all through ``icl_retriever.search.ranking`` as ``get_demos`` runs them), paired against the default
  ``task_then_topic`` with margin 0.1, and the oracle (the demo the LM liked best);
* the within-query correlation of each feature with the NLL;
* a linear listwise reranker (softmax over a query's candidates, fitted to the LM's softmax(-NLL / 0.2)),
  5-fold cross-validated by query, on feature sets that ``get_demos`` could compute at query time.

    python -m benchmarks.llm_preferences --queries 150 --candidates 10 --json prefs.json   # collect + analyse
    python -m benchmarks.llm_preferences --from-json prefs.json                            # analyse again
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_retriever.records import Demo, is_ieb, load_pool
from icl_retriever.search.ranking import rerank_order

ROOT = Path(__file__).resolve().parents[1]
SNI_TRAIN = ROOT.parent / "shared" / "data" / "sni" / "sni_train.json"
FEATURES = ("pie", "content", "output_words", "instruction_words")


def labelled_pool(path: Path, label_field: str) -> list[Demo]:
    """A pool file; an IEB-format file (label -> samples, as SNI's) with each group's label as ``label_field``
    (its samples' own ``task`` field, SNI's task name, stays metadata)."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
    if not is_ieb(data):
        return load_pool(path)
    return load_pool([{**s, "metadata": {label_field: label}} for label, group in data.items() for s in group["samples"]])


def collect(pool: Sequence[Demo], n_queries: int, n_candidates: int, model: str, seed: int) -> list[dict]:
    """Per query: zero-shot NLL (``demo`` None) and the k = 1 NLL of each of the best candidates by PIE."""
    import torch

    from icl_retriever import PIEEncoder
    from icl_retriever.downstream import LMScorer, load_causal_lm, sample_queries, twin_key
    from icl_retriever.topic import default_topic_encoder, topic_text

    torch.set_num_threads(2)
    encoder = PIEEncoder()
    content_encoder, _ = default_topic_encoder(encoder)
    pie = encoder.encode([d.instruction for d in pool], show_progress_bar=False)
    content = content_encoder.encode([topic_text(d) for d in pool], show_progress_bar=False)
    keys = np.array([twin_key(d.instruction) for d in pool], dtype=object)
    scorer = LMScorer(load_causal_lm(model))
    items, rows = [], []
    for q in sample_queries(pool, n_queries, seed):
        candidates = np.flatnonzero(keys != twin_key(pool[q].instruction))
        pie_scores, content_scores = pie[candidates] @ pie[q], content[candidates] @ content[q]
        items.append(scorer.build([], pool[q], pool[q].output).item)
        rows.append({"query": q, "demo": None, "pie": None, "content": None})
        for r in np.argsort(-pie_scores, kind="stable")[:n_candidates]:
            items.append(scorer.build([pool[candidates[r]]], pool[q], pool[q].output).item)
            rows.append({"query": q, "demo": int(candidates[r]), "pie": float(pie_scores[r]),
                         "content": float(content_scores[r])})
    scored = scorer.score(items, show_progress_bar=True)
    for row, logprobs in zip(rows, scored, strict=True):
        row["nll"] = float(-logprobs.mean())
    return rows


def features(pool: Sequence[Demo], query: int, cands: Sequence[dict]) -> np.ndarray:
    demos = [pool[c["demo"]] for c in cands]
    return np.stack([
        [c["pie"] for c in cands],
        [c["content"] for c in cands],
        np.log1p([len(d.output.split()) for d in demos]),
        np.log1p([len(d.instruction.split()) for d in demos]),
    ], axis=1)


def fit_listwise(X: Sequence[np.ndarray], Y: Sequence[np.ndarray], *, tau: float = 0.2, l2: float = 1e-2,
                 steps: int = 2000, lr: float = 0.5) -> np.ndarray:
    """Weights w of a linear scorer whose softmax over each query's candidates matches softmax(-NLL / tau)."""
    w = np.zeros(X[0].shape[1])
    for _ in range(steps):
        grad = np.zeros_like(w)
        for x, y in zip(X, Y, strict=True):
            target = np.exp(-(y - y.min()) / tau)
            s = x @ w
            p = np.exp(s - s.max())
            grad += x.T @ (p / p.sum() - target / target.sum())
        w -= lr * (grad / len(X) + l2 * w)
    return w


def analyse(pool: Sequence[Demo], rows: Sequence[dict], label_field: str) -> None:
    zero = {r["query"]: r["nll"] for r in rows if r["demo"] is None}
    by_query: dict[int, list[dict]] = {}
    for r in rows:
        if r["demo"] is not None:
            by_query.setdefault(r["query"], []).append(r)
    queries = sorted(by_query)
    X = {q: features(pool, q, by_query[q]) for q in queries}
    Y = {q: np.array([c["nll"] for c in by_query[q]]) for q in queries}
    same = {q: np.array([pool[c["demo"]].metadata.get(label_field) == pool[q].metadata.get(label_field)
                         for c in by_query[q]]) for q in queries}
    default = {q: rerank_order("task_then_topic", X[q][:, 0], X[q][:, 1], margin=0.1)[0] for q in queries}
    n_cand = max(len(v) for v in by_query.values())
    print(f"{len(queries)} queries, {n_cand} candidates each (best by PIE), k = 1; zero-shot NLL "
          f"{np.mean([zero[q] for q in queries]):.3f}")
    print("| first demo chosen by | NLL/token | Δ vs task_then_topic:0.1 | same-task |")
    print("|---|---|---|---|")

    def row(name: str, first: dict[int, int]) -> None:
        diff = np.array([Y[q][first[q]] - Y[q][default[q]] for q in queries])
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if diff.any() else 0.0
        print(f"| {name} | {np.mean([Y[q][first[q]] for q in queries]):.3f} | {diff.mean():+.3f} +- {se:.3f} "
              f"| {np.mean([same[q][first[q]] for q in queries]):.3f} |")

    row("task order (`rerank=None`)", {q: int(np.argmax(X[q][:, 0])) for q in queries})
    row("content only (within the candidates)", {q: int(np.argmax(X[q][:, 1])) for q in queries})
    for margin in (0.05, 0.1, 0.2):
        row(f"task_then_topic:{margin:g}",
            {q: rerank_order("task_then_topic", X[q][:, 0], X[q][:, 1], margin=margin)[0] for q in queries})
    for weight in (0.3, 0.5, 0.7):
        row(f"hybrid:{weight:g}", {q: rerank_order("hybrid", X[q][:, 0], X[q][:, 1], weight=weight)[0] for q in queries})
    folds = np.array_split(np.random.default_rng(0).permutation(queries), 5)
    for cols in ([0, 1], [0, 1, 2], list(range(len(FEATURES)))):
        first, weights = {}, []
        for fold in folds:
            held = set(fold.tolist())
            train = [q for q in queries if q not in held]
            w = fit_listwise([X[q][:, cols] for q in train], [Y[q] for q in train])
            weights.append(w)
            first.update({q: int(np.argmax(X[q][:, cols] @ w)) for q in fold.tolist()})
        mean_w = ", ".join(f"{FEATURES[c]} {v:+.2f}" for c, v in zip(cols, np.mean(weights, axis=0), strict=True))
        row(f"learned, 5-fold ({mean_w})", first)
    row("oracle (the LM's best)", {q: int(np.argmin(Y[q])) for q in queries})
    for j, name in enumerate(FEATURES):
        corr = [np.corrcoef(X[q][:, j], Y[q])[0, 1] for q in queries if X[q][:, j].std() > 0 and Y[q].std() > 0]
        if corr:
            print(f"<!-- within-query correlation with NLL, {name}: {np.mean(corr):+.3f} over {len(corr)} queries -->")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_preferences", description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=SNI_TRAIN, help="IEB/SNI-format file, or a demo pool with outputs")
    ap.add_argument("--label-field", default="category", help="metadata field of a pool's task label")
    ap.add_argument("--queries", type=int, default=150)
    ap.add_argument("--candidates", type=int, default=10, help="best demos by PIE scored per query")
    ap.add_argument("--model", default="gemma3-270m", help="causal LM (as benchmarks.downstream takes it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the collected preferences here")
    ap.add_argument("--from-json", type=Path, help="analyse preferences collected before (same --pool)")
    args = ap.parse_args(argv)
    pool = labelled_pool(args.pool, args.label_field)
    if args.from_json:
        rows = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        started = time.perf_counter()
        rows = collect(pool, args.queries, args.candidates, args.model, args.seed)
        print(f"<!-- collected {len(rows)} LM scores in {time.perf_counter() - started:.0f} s -->")
        if args.json:
            args.json.write_text(json.dumps(rows) + "\n", encoding="utf-8")
    analyse(pool, rows, args.label_field)


if __name__ == "__main__":
    main()
