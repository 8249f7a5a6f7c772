"""Selection: find each query's candidates, then order, de-duplicate and cut them into the demos returned."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from icl_retriever.search.candidates import find_candidates
from icl_retriever.search.controls import SearchControls
from icl_retriever.search.ranking import dedup_keep, mmr_order, rerank_order
from icl_retriever.search.budget import count_within, format_demo, pack_by_tokens
from icl_retriever.records import Demo
from icl_retriever.search.snapshot import Snapshot
from icl_retriever.store import cosines, search, stored_vectors

Counter = Callable[[list[str]], list[int]]


def select_batch(
    state: Snapshot,
    queries: Sequence[str],
    vectors: np.ndarray,
    topic_vectors: np.ndarray | None,
    ctl: SearchControls,
    counter: Counter | None,
) -> list[list[Demo]]:
    """The demos of every query (rows of ``vectors``, and of ``topic_vectors`` when ranking by topic).

    Without a filter, candidates come from one FAISS search for the whole batch; with one, per query.
    """
    need = min(ctl.n_candidates, len(state.demos))
    if need == 0:
        return [[] for _ in queries]
    if ctl.filter is None and not ctl.exclude_query:
        scores, ids = search(state.index, vectors, need)
        found = [(row_i[row_i >= 0], row_s[row_i >= 0]) for row_s, row_i in zip(scores, ids, strict=True)]
    else:
        found = [find_candidates(state, q, v, need, ctl) for q, v in zip(queries, vectors, strict=True)]
    return [
        select(state, vectors[i], None if topic_vectors is None else topic_vectors[i], rows, scores, ctl, counter)
        for i, (rows, scores) in enumerate(found)
    ]


def select(
    state: Snapshot,
    vector: np.ndarray,
    topic_vector: np.ndarray | None,
    rows: np.ndarray,
    scores: np.ndarray,
    ctl: SearchControls,
    counter: Counter | None,
) -> list[Demo]:
    """Order, de-duplicate and cut the candidates (best first by PIE score) of one query."""
    if ctl.min_score is not None:  # resolved to a cosine by get_demos_batch
        keep = scores >= float(ctl.min_score)
        rows, scores = rows[keep], scores[keep]
    if not len(rows):
        return []
    order = list(range(len(rows)))
    if ctl.rerank is not None and ctl.rerank != "auto":
        assert state.topic is not None and topic_vector is not None
        topic_scores = cosines(state.topic, rows, topic_vector)
        order = rerank_order(ctl.rerank, scores, topic_scores, weight=ctl.rerank_weight, margin=ctl.rerank_margin)
    elif ctl.diversity > 0:
        order = mmr_order(vector, stored_vectors(state.index, rows), ctl.diversity)
    if ctl.dedup is not None:
        space = state.topic if state.topic is not None else state.index
        ordered_rows = np.ascontiguousarray(rows[order], dtype=np.int64)
        order = [order[j] for j in dedup_keep(stored_vectors(space, ordered_rows), ctl.dedup)]
    if ctl.max_tokens is not None:
        assert counter is not None
        texts = [format_demo(state.demos[int(rows[j])], ctl.demo_format) for j in order]
        order = [order[j] for j in pack_by_tokens(count_within(counter, texts, ctl.max_tokens), ctl.max_tokens, ctl.k)]
    else:
        order = order[: ctl.k]
    return state.scored([rows[j] for j in order], [scores[j] for j in order])
