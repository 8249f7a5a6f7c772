"""Ordering candidates: MMR, task-then-topic and hybrid reranking, and near-duplicate removal. Pure
functions over numpy arrays, each tested on its own."""

from __future__ import annotations

from typing import Literal

import numpy as np

#: Cosine above which two demos count as near-duplicates when ``dedup=True``.
DEFAULT_DEDUP_THRESHOLD = 0.95
#: ``rerank="task_then_topic"``: demos whose PIE similarity is within this of the best one count as the
#: query's task. Chosen downstream (docs/benchmarks.md, "Choosing the default ranking"): with 0.1, an LLM's gold-output NLL
#: was lowest on the default pool and SNI dev; larger margins trade task for topic.
DEFAULT_RERANK_MARGIN = 0.1
#: ``rerank="hybrid"``: weight of the PIE (task) cosine; the plain (content) cosine gets ``1 - weight``.
DEFAULT_HYBRID_WEIGHT = 0.5
#: Re-ranking methods.
RERANKERS = ("task_then_topic", "hybrid")
Rerank = Literal["task_then_topic", "hybrid"]


# ordering ---------------------------------------------------------------------------------------


def mmr_order(query: np.ndarray, candidates: np.ndarray, diversity: float, limit: int | None = None) -> list[int]:
    """Maximal marginal relevance order of candidate rows (as LangChain's MMR selector).

    Each step picks the candidate maximising ``(1 - diversity) * sim(query, c) - diversity * max sim(c,
    chosen)``; ``diversity=0`` is the plain similarity order, 1 only avoids redundancy. Vectors are
    L2-normalised rows, so similarity is the inner product.

    Returns:
        Indices into ``candidates``, in pick order (``limit`` of them, default all).
    """
    n = len(candidates)
    limit = n if limit is None else min(limit, n)
    if n == 0 or limit <= 0:
        return []
    relevance = candidates @ query
    if diversity <= 0.0:
        return [int(i) for i in np.argsort(-relevance, kind="stable")[:limit]]
    lam = 1.0 - diversity
    pairwise = candidates @ candidates.T
    chosen = [int(np.argmax(relevance))]
    redundancy = pairwise[chosen[0]].copy()
    available = np.ones(n, dtype=bool)
    available[chosen[0]] = False
    while len(chosen) < limit:
        score = lam * relevance - diversity * redundancy
        score[~available] = -np.inf
        pick = int(np.argmax(score))
        chosen.append(pick)
        available[pick] = False
        np.maximum(redundancy, pairwise[pick], out=redundancy)
    return chosen


def task_then_topic_order(task_scores: np.ndarray, topic_scores: np.ndarray, margin: float) -> list[int]:
    """Order candidates: those within ``margin`` of the best task score, by topic score; then the rest.

    Args:
        task_scores: PIE cosine of each candidate to the query (the task match).
        topic_scores: plain-embedding cosine of each candidate's instruction + input to the query.
        margin: a candidate with ``task_score >= max - margin`` counts as the query's task.

    Returns:
        Indices into the candidates: the same-task group by topic score (ties by task score), then the
        others by task score.
    """
    n = len(task_scores)
    if n == 0:
        return []
    task_scores = np.asarray(task_scores, dtype=np.float64)
    topic_scores = np.asarray(topic_scores, dtype=np.float64)
    same = task_scores >= task_scores.max() - margin
    group = np.flatnonzero(same)
    rest = np.flatnonzero(~same)
    group = group[np.lexsort((-task_scores[group], -topic_scores[group]))]
    rest = rest[np.argsort(-task_scores[rest], kind="stable")]
    return [int(i) for i in np.concatenate([group, rest])]


def hybrid_order(task_scores: np.ndarray, topic_scores: np.ndarray, weight: float) -> list[int]:
    """Order candidates by ``weight * task + (1 - weight) * topic`` cosine, best first (ties: task score)."""
    task_scores = np.asarray(task_scores, dtype=np.float64)
    mixed = weight * task_scores + (1.0 - weight) * np.asarray(topic_scores, dtype=np.float64)
    return [int(i) for i in np.lexsort((-task_scores, -mixed))]


def rerank_order(
    rerank: Rerank,
    task_scores: np.ndarray,
    topic_scores: np.ndarray,
    *,
    weight: float = DEFAULT_HYBRID_WEIGHT,
    margin: float = DEFAULT_RERANK_MARGIN,
) -> list[int]:
    """Order candidates by a re-ranking method (:func:`hybrid_order` or :func:`task_then_topic_order`)."""
    if rerank == "hybrid":
        return hybrid_order(task_scores, topic_scores, weight)
    return task_then_topic_order(task_scores, topic_scores, margin)


def dedup_keep(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows to keep, in order, dropping any row whose cosine to an earlier kept row exceeds ``threshold``.

    Rows are L2-normalised; an exact duplicate (cosine 1) is dropped for any threshold below or at 1
    (``>=`` is used at threshold 1 so that exact duplicates still go).
    """
    kept: list[int] = []
    for i in range(len(vectors)):
        if kept:
            sims = vectors[kept] @ vectors[i]
            top = float(sims.max())
            if top > threshold or (threshold >= 1.0 and top >= 1.0 - 1e-6):
                continue
        kept.append(i)
    return kept
