"""Candidate generation: the best demos for a query vector that pass the filters, read from a snapshot.

Without filters one FAISS search serves a whole batch of queries (in the retriever). With them, a
metadata filter that matches few demos is searched exactly over just those; otherwise the search
over-fetches and doubles its depth until enough demos pass, falling back to exact search when an
approximate index cannot return every demo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from icl_retriever.search.controls import SearchControls
from icl_retriever.search.filters import as_predicate, query_matcher
from icl_retriever.search.snapshot import Snapshot
from icl_retriever.store import cosines, search

#: A metadata filter matching at most this many demos is searched exactly over just those demos.
EXACT_FILTER_MAX = 4096


def find_candidates(
    state: Snapshot, query: str, vector: np.ndarray, need: int, ctl: SearchControls
) -> tuple[np.ndarray, np.ndarray]:
    """The ``need`` best demos passing ``filter`` / ``exclude_query``, filtered during the search."""
    n = len(state.demos)
    spec = ctl.filter
    is_query = query_matcher(query) if ctl.exclude_query else None
    excluded: Callable[[int], bool] = (
        (lambda row: is_query(state.demos[row])) if is_query is not None else (lambda row: False)
    )
    if spec is not None and not callable(spec):
        allowed = state.meta.rows(spec)
        if len(allowed) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if len(allowed) <= EXACT_FILTER_MAX:
            return exact(state, allowed, vector, need, excluded)
        mask = np.zeros(n, dtype=bool)
        mask[allowed] = True
        # start deep enough to expect `need` matches at the filter's match rate
        start = math.ceil(1.5 * need * n / len(allowed)) + need
        return overfetch(state, vector, need, lambda row: bool(mask[row]) and not excluded(row), start)
    predicate = as_predicate(spec)
    if predicate is None:
        return overfetch(state, vector, need, lambda row: not excluded(row), need + 4)
    demos = state.demos
    return overfetch(
        state, vector, need, lambda row: bool(predicate(demos[row])) and not excluded(row), max(4 * need, 32)
    )

def exact(
    state: Snapshot, rows: np.ndarray, vector: np.ndarray, need: int, excluded: Callable[[int], bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over the given rows only (their stored vectors read back from the index)."""
    scores = cosines(state.index, rows, vector)
    order = np.argsort(-scores, kind="stable")
    keep_rows: list[int] = []
    keep_scores: list[float] = []
    for j in order:
        row = int(rows[j])
        if excluded(row):
            continue
        keep_rows.append(row)
        keep_scores.append(float(scores[j]))
        if len(keep_rows) == need:
            break
    return np.asarray(keep_rows, dtype=np.int64), np.asarray(keep_scores, dtype=np.float32)

def overfetch(
    state: Snapshot, vector: np.ndarray, need: int, accept: Callable[[int], bool], start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``fetch`` deep, keep accepted rows; double ``fetch`` until ``need`` are found or the pool is exhausted."""
    n = state.index.ntotal
    fetch = min(max(start, need), n)
    seen: dict[int, bool] = {}  # a predicate runs once per demo, whatever the rounds
    while True:
        scores, ids = search(state.index, vector[None, :], fetch)
        rows: list[int] = []
        kept: list[float] = []
        for score, row in zip(scores[0], ids[0], strict=True):
            if row < 0:
                continue
            ok = seen.get(int(row))
            if ok is None:
                ok = seen[int(row)] = accept(int(row))
            if ok:
                rows.append(int(row))
                kept.append(float(score))
                if len(rows) == need:
                    break
        if len(rows) >= need:
            break
        if fetch >= n:
            if int((ids[0] >= 0).sum()) < n:
                # an approximate index did not return every demo even at full depth: go exact
                passing = np.asarray([r for r in range(n) if seen.get(r, None) or (r not in seen and accept(r))])
                if not len(passing):
                    break
                return exact(state, passing, vector, need, lambda row: False)
            break  # the pool is exhausted
        fetch = min(fetch * 2, n)
    return np.asarray(rows, dtype=np.int64), np.asarray(kept, dtype=np.float32)
