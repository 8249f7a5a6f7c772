"""recall@10 of an approximate index against exact search, and tuning HNSW ``efSearch`` / IVF ``nprobe`` to a target."""

from __future__ import annotations

import faiss
import numpy as np

from icl_retriever.store.faiss_index import all_vectors, describe_index

#: recall@10 an approximate index aims for when ``ef_search`` / ``nprobe`` are tuned at build time.
TARGET_RECALL = 0.95
_MAX_EF_SEARCH = 1024


class _RecallProbe:
    """recall@10 of an approximate index against exact search, on queries between stored vectors.

    Stored vectors themselves are easy queries (each finds itself), which overstates recall: a real
    query lies between demos, so each probe is the normalised sum of two random stored vectors.

    A returned neighbour counts as a hit when it is at least as similar as the exact 10th neighbour
    (within 1e-5), so identical instructions (tied vectors) returned in another order are not misses.
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
        self.index = index

    def __call__(self) -> float:
        scores, ids = self.index.search(self.queries, self.k)
        return float(((scores >= self.threshold) & (ids >= 0)).sum() / scores.size)


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
        vectors: the index's vectors in id order, if at hand (else they are read back from the index).
        tune_to: raise HNSW ``efSearch`` / IVF ``nprobe`` (doubling, up to 1024 / nlist) until recall
            reaches this value or stops improving; the index keeps the setting reached.
        sample: how many stored vectors to use as queries.
    """
    if index.ntotal == 0 or describe_index(index)[0] == "flat":
        return None
    probe = _RecallProbe(index, vectors, sample=sample, seed=seed)
    recall = probe()
    while tune_to is not None and recall < tune_to:
        if isinstance(index, faiss.IndexHNSWFlat) and index.hnsw.efSearch < _MAX_EF_SEARCH:
            index.hnsw.efSearch = min(2 * index.hnsw.efSearch, _MAX_EF_SEARCH)
        elif isinstance(index, faiss.IndexIVFFlat) and index.nprobe < index.nlist:
            index.nprobe = min(2 * index.nprobe, index.nlist)
        else:
            break
        recall = probe()
    return recall

