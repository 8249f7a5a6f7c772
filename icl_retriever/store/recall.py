"""recall@10 of an approximate index against exact search, and tuning HNSW ``efSearch`` / IVF ``nprobe`` to a target."""

from __future__ import annotations

import faiss
import numpy as np

from icl_retriever.store.faiss_index import all_vectors, describe_index

#: recall@10 an approximate index aims for when ``ef_search`` / ``nprobe`` are tuned at build time.
TARGET_RECALL = 0.95
_MAX_EF_SEARCH = 1024
#: Tuning stops when doubling efSearch / nprobe gains less recall@10 than this (and keeps the smaller value).
_MIN_GAIN = 0.005


class _RecallProbe:
    """recall@10 of an approximate index against exact search, on queries between stored vectors.

    Stored vectors themselves are easy queries (each finds itself), which overstates recall: a real
    query lies between demos, so each probe is the normalised sum of two random stored vectors.

    A returned neighbour counts as a hit when it is at least as similar as the exact 10th neighbour
    (within 1e-5), so identical instructions (tied vectors) returned in another order are not misses.
    Similarity is recomputed from the true vectors: an IVF-PQ index's own scores are approximations.
    """

    def __init__(self, index: faiss.Index, vectors: np.ndarray | None, *, sample: int = 1000, seed: int = 0) -> None:
        base = all_vectors(index) if vectors is None else np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(base)
        self.k = min(10, n)
        rng = np.random.default_rng(seed)
        ids = rng.choice(n, size=min(sample, n), replace=False)
        mixed = base[ids] + base[rng.permutation(ids)]
        norms = np.linalg.norm(mixed, axis=1, keepdims=True)
        self.queries = np.ascontiguousarray(mixed / np.where(norms > 0, norms, 1), dtype=np.float32)
        exact, _ = faiss.knn(self.queries, base, self.k, metric=faiss.METRIC_INNER_PRODUCT)
        self.threshold = exact[:, -1:] - 1e-5
        self.index, self.base = index, base

    def __call__(self) -> float:
        _, ids = self.index.search(self.queries, self.k)
        found = ids >= 0
        scores = np.einsum("qd,qkd->qk", self.queries, self.base[np.where(found, ids, 0)])
        return float(((scores >= self.threshold) & found).sum() / ids.size)


def measure_recall(
    index: faiss.Index,
    vectors: np.ndarray | None = None,
    *,
    tune_to: float | None = None,
    sample: int = 1000,
    seed: int = 0,
) -> float | None:
    """recall@10 of an approximate index against exact search (``None`` for flat or empty indexes).

    Args:
        vectors: the index's vectors in id order, if at hand (else they are read back from the index; an
            IVF-PQ index holds only approximations of them, so its recall is then unknown: ``None``).
        tune_to: raise HNSW ``efSearch`` / IVF ``nprobe`` (doubling, up to 1024 / nlist) until recall
            reaches this value or a doubling gains less than 0.005 (then the smaller setting is kept).
        sample: how many stored vectors to use as queries.
    """
    kind = describe_index(index)[0] if index.ntotal else "flat"
    if kind == "flat" or (kind == "ivfpq" and vectors is None):
        return None  # exact; or the true vectors of an IVF-PQ index are not at hand (only its codes)
    probe = _RecallProbe(index, vectors, sample=sample, seed=seed)
    recall = probe()
    while tune_to is not None and recall < tune_to:
        if isinstance(index, faiss.IndexHNSWFlat) and index.hnsw.efSearch < _MAX_EF_SEARCH:
            before = index.hnsw.efSearch
            index.hnsw.efSearch = min(2 * before, _MAX_EF_SEARCH)
        elif isinstance(index, faiss.IndexIVF) and index.nprobe < index.nlist:
            before = index.nprobe
            index.nprobe = min(2 * before, index.nlist)
        else:
            break
        gained = probe()
        if gained < recall + _MIN_GAIN:  # a plateau (IVF-PQ's codes limit it): twice the work for nothing
            if isinstance(index, faiss.IndexHNSWFlat):
                index.hnsw.efSearch = before
            else:
                index.nprobe = before
            break
        recall = gained
    return recall

