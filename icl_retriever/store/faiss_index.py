"""FAISS indexes as this library builds them: flat, HNSW, IVF or IVF-PQ over inner product, and search.

An index is described by its type and :class:`~icl_retriever.store.manifest.IndexParams`; updates rebuild
it with the same ones. Stored vectors are unit vectors (cosine = inner product): :func:`non_unit_vector`
finds one that is not, reading FAISS's storage in place. IVF-PQ stores codes whose reconstructions are
only near unit length, so :func:`search` and :func:`cosines` divide by the reconstruction's norm: every
score they return is a cosine, checked to lie in [-1, 1].
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from icl_retriever.errors import IndexFormatError
from icl_retriever.store.manifest import PARAMS_OF, IndexParams, IndexType
from icl_retriever.store.pq_codes import pq_out_of_range

logger = logging.getLogger(__name__)

#: ``auto`` index type: exact search below this many demos, HNSW from here on.
AUTO_HNSW_FROM = 200_000
#: Defaults of the approximate index types (IVF's nlist defaults to :func:`default_nlist`).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32
#: IVF-PQ: bits per sub-quantiser code (one byte), so training needs at least 2**8 vectors.
PQ_NBITS = 8
PQ_MIN_TRAIN = 1 << PQ_NBITS
PQ_GOOD_TRAIN = 39 * PQ_MIN_TRAIN  # FAISS's advice: 39 training points per centroid
_ADD_BLOCK = 20_000  # vectors per add() call while building an approximate index (progress granularity)
#: A stored vector is a unit vector: its squared norm is 1 within this (float32 round-off is ~1e-6).
UNIT_NORM_TOLERANCE = 1e-3
#: A score is a cosine: within this of [-1, 1] (a unit vector's norm is within 5e-4 of 1, plus round-off).
SCORE_TOLERANCE = 1e-3
_CHECK_ROWS = 65_536  # rows per block of the norm check (bounded temporary memory)


def new_flat_index(vectors: np.ndarray, dim: int | None = None) -> faiss.Index:
    """Exact inner-product index (cosine, since rows are normalised)."""
    index = faiss.IndexFlatIP(int(dim if dim is not None else vectors.shape[1]))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def all_vectors(index: faiss.Index) -> np.ndarray:
    """Every stored vector, in id order, as the unit vectors scores are cosines against (IVF-PQ: its
    reconstructions, normalised, as :func:`stored_vectors` gives them): what selection, updates and recall read."""
    if index.ntotal == 0:
        return np.empty((0, index.d), dtype=np.float32)
    return _as_unit(index, index.reconstruct_n(0, index.ntotal))


def _as_unit(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """Reconstructed rows of ``index`` as the unit vectors its scores are cosines against: IVF-PQ's
    reconstructions normalised in place; other types store unit vectors (checked at load)."""
    if isinstance(index, faiss.IndexIVFPQ) and len(x):
        with np.errstate(all="ignore"):
            x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def default_nlist(n: int) -> int:
    """IVF clusters for ``n`` vectors: about sqrt(n), with at least 39 training points per cluster."""
    return max(1, min(round(float(np.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """IVF-PQ sub-quantisers for ``dim``: one byte per 4 dimensions (96 for 384: 16x smaller than float32),
    a divisor of ``dim``. On 20,814 real instruction embeddings this kept recall@10 at 0.88 (48: 0.75)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def check_index_fits(index_type: str, params: IndexParams | None, count: int, dim: int) -> None:
    """Refuse, before any work, an index that cannot hold ``count`` vectors of ``dim``: IVF-PQ's ``pq_m`` must
    divide the dimension, and its 8-bit quantisers need at least 256 vectors to train.

    Raises:
        ValueError: naming the parameter and what to do instead.
    """
    if index_type != "ivfpq":
        return
    m = (params.pq_m if params is not None else None) or default_pq_m(dim)
    if dim % m:
        raise ValueError(f"pq_m must divide the dimension {dim}, got {m}")
    if count < PQ_MIN_TRAIN:
        raise ValueError(
            f"an ivfpq index needs at least {PQ_MIN_TRAIN} demos to train its {PQ_MIN_TRAIN}-code quantisers, got "
            f"{count}; use a flat or ivf index for a pool this small"
        )


def new_index(
    vectors: np.ndarray,
    index_type: IndexType = "flat",
    params: IndexParams | None = None,
    *,
    dim: int | None = None,
    progress: bool = False,
) -> faiss.Index:
    """A new inner-product index of ``index_type`` holding ``vectors`` (row i gets id i).

    This is also how an index is rebuilt after an update (see :func:`rebuild_index`): HNSW cannot
    remove vectors in place, and a rebuild keeps the graph as good as a fresh build.

    Args:
        params: HNSW ``M`` / ``ef_construction`` / ``ef_search`` (defaults :data:`HNSW_M`, ...); IVF
            ``nlist`` (default :func:`default_nlist`, capped at the vector count) and ``nprobe``; IVF-PQ
            also ``pq_m`` (default :func:`default_pq_m`). Fields of other index types must be unset.
        progress: show a progress bar while filling an approximate index.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = int(dim if dim is not None else vectors.shape[1])
    p = params or IndexParams()
    stray = [name for name, value in p if value is not None and name not in PARAMS_OF[index_type]]
    if stray:
        raise ValueError(f"index type {index_type!r} takes no parameter(s) {', '.join(stray)}")
    if index_type == "flat":
        return new_flat_index(vectors, d)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, p.M or HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p.ef_construction or HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = p.ef_search or HNSW_EF_SEARCH
    elif index_type in ("ivf", "ivfpq"):
        n = len(vectors)
        # FAISS's k-means wants >= 39 training points per cluster: a small pool gets fewer clusters.
        nlist = max(1, min(p.nlist or default_nlist(n), n // 39)) if n else (p.nlist or 1)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            check_index_fits(index_type, p, n, d)
            m = p.pq_m or default_pq_m(d)
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
            if n < PQ_GOOD_TRAIN:  # FAISS would print its warning once per sub-quantiser; say it once
                index.pq.cp.min_points_per_centroid = 1
                logger.warning(
                    "ivfpq index of %d demos: its quantisers train best on %d or more; recall suffers (a flat "
                    "index is exact and small at this size)", n, PQ_GOOD_TRAIN,
                )
        index.nprobe = min(p.nprobe or IVF_NPROBE, nlist)
        index.set_direct_map_type(faiss.DirectMap.Array)  # so stored vectors can be read back for updates
        if n:
            wanted = 64 * nlist if index_type == "ivf" else max(64 * nlist, 64 * PQ_MIN_TRAIN)
            sample = np.random.default_rng(0).choice(n, size=min(n, wanted), replace=False)
            index.train(vectors[np.sort(sample)])
    else:
        raise ValueError(f"unknown index type {index_type!r}; expected one of {sorted(PARAMS_OF)}")
    from tqdm.auto import tqdm

    with tqdm(total=len(vectors), desc=f"Indexing ({index_type})", unit=" demos", unit_scale=True,
              disable=not progress or not len(vectors)) as bar:
        for start in range(0, len(vectors), _ADD_BLOCK):
            block = vectors[start : start + _ADD_BLOCK]
            index.add(block)
            bar.update(len(block))
    return index


def describe_index(index: faiss.Index) -> tuple[IndexType, IndexParams]:
    """The index type and parameters of a FAISS index this library builds.

    Raises:
        ValueError: a FAISS index of another kind or metric.
    """
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"expected an inner-product index, got metric {index.metric_type}")
    if isinstance(index, faiss.IndexHNSWFlat):
        hnsw = index.hnsw
        return "hnsw", IndexParams(M=hnsw.nb_neighbors(1), ef_construction=hnsw.efConstruction, ef_search=hnsw.efSearch)
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf", IndexParams(nlist=index.nlist, nprobe=index.nprobe)
    if isinstance(index, faiss.IndexIVFPQ) and type(index) is faiss.IndexIVFPQ:
        if index.pq.nbits != PQ_NBITS:
            raise ValueError(f"IVF-PQ codes of {index.pq.nbits} bits; this library writes {PQ_NBITS}")
        return "ivfpq", IndexParams(nlist=index.nlist, nprobe=index.nprobe, pq_m=index.pq.M)
    if isinstance(index, faiss.IndexFlat):
        return "flat", IndexParams()
    raise ValueError(f"unsupported FAISS index class {type(index).__name__}")


def rebuild_index(index: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """A new index of the same type and parameters as ``index``, holding ``vectors`` (for add / remove).

    Cost: flat is a copy; HNSW rebuilds its graph (on 2 cores roughly 1-3k vectors/s); IVF keeps
    ``nlist`` (capped at the new count) and retrains its clusters.

    Raises:
        ValueError: an IVF-PQ index, which keeps compressed codes, not the vectors to rebuild from.
    """
    check_rebuildable(index)
    index_type, params = describe_index(index)
    return new_index(vectors, index_type, params, dim=index.d)


def check_rebuildable(index: faiss.Index) -> None:
    """Refuse an index that cannot be rebuilt from what it stores (IVF-PQ keeps codes, not vectors).

    Raises:
        ValueError: saying to rebuild from the pool.
    """
    if isinstance(index, faiss.IndexIVFPQ):
        raise ValueError(
            "an ivfpq index stores compressed codes, not vectors, so demos cannot be added or removed in place; "
            "rebuild it from the pool (icl-retriever build ... --force)"
        )


def configure_index(index: faiss.Index, params: IndexParams) -> None:
    """Apply the search-time parameters (HNSW ``ef_search``, IVF ``nprobe``) to a loaded index."""
    if isinstance(index, faiss.IndexHNSWFlat) and params.ef_search:
        index.hnsw.efSearch = params.ef_search
    elif isinstance(index, faiss.IndexIVF) and params.nprobe:
        index.nprobe = params.nprobe


def search(index: faiss.Index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best stored vectors for each query (unit rows of ``vectors``): ``(scores, ids)`` as FAISS's
    ``index.search``, every score a cosine in [-1, 1].

    For IVF-PQ, FAISS's inner products with reconstructions are replaced by cosines (each divided by the
    reconstruction's norm) and each row re-sorted by them. A single query runs on one OpenMP thread: FAISS
    parallelises over queries, and for one query the extra threads only add synchronisation (2 threads
    measured 4-5x slower than 1 on a 2-core machine); the setting is per thread, so concurrent searches in
    other threads are unaffected.

    Raises:
        IndexFormatError: a score that is not a cosine (see :func:`check_scores`).
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) != 1:
        scores, ids = index.search(x, k)
    else:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, ids = index.search(x, k)
        finally:
            faiss.omp_set_num_threads(before)
    if isinstance(index, faiss.IndexIVFPQ):
        for row, (query, found) in enumerate(zip(x, ids, strict=True)):
            hits = found[found >= 0]  # FAISS puts missing results (-1) last
            if len(hits):
                exact = stored_vectors(index, hits) @ query  # checked with the rest below
                order = np.argsort(-exact, kind="stable")
                ids[row, : len(hits)], scores[row, : len(hits)] = hits[order], exact[order]
    check_scores(scores[ids >= 0])
    return scores, ids


def stored_vectors(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """The stored vectors at ``rows``, as the unit vectors scores are cosines against (IVF-PQ: its
    reconstructions, normalised; others: as stored, unit vectors checked at load)."""
    return _as_unit(index, index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64)))


def cosines(index: faiss.Index, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Cosine of the unit ``vector`` with the stored vectors at ``rows`` (see :func:`stored_vectors`).

    Raises:
        IndexFormatError: a score that is not a cosine (see :func:`check_scores`).
    """
    scores = stored_vectors(index, rows) @ np.asarray(vector, dtype=np.float32)
    check_scores(scores)
    return scores


def check_scores(scores: np.ndarray) -> None:
    """Refuse scores that are not cosines: after the load checks none can be, unless the index changed since
    (a memory-mapped file rewritten in place) or a vector was added unnormalised. An error, not a clamp: a
    clamped score would still rank its demo first.

    Raises:
        IndexFormatError: naming the score.
    """
    with np.errstate(all="ignore"):
        bad = ~(np.abs(scores) <= 1 + SCORE_TOLERANCE)  # NaN fails too
    if bad.any():
        raise IndexFormatError(
            f"a search score of {float(np.asarray(scores)[bad].flat[0]):.4g} is not a cosine in [-1, 1]: the index "
            "holds a vector that is not a unit vector (changed after it was loaded and checked?)"
        )


def non_unit_vector(index: faiss.Index) -> tuple[int, float] | None:
    """``(id, norm)`` of the first stored vector that is not a finite unit vector, or ``None``; for IVF-PQ, of
    the first code whose reconstruction's norm is outside :data:`~icl_retriever.store.pq_codes.PQ_NORM_RANGE`.

    Reads FAISS's storage in place (no copy of a large index), a block at a time.
    """
    d, n = index.d, index.ntotal
    if n == 0:
        return None
    if isinstance(index, faiss.IndexIVFPQ):
        return pq_out_of_range(index)
    if isinstance(index, faiss.IndexIVFFlat):
        lists = index.invlists
        blocks = (
            (faiss.rev_swig_ptr(lists.get_ids(i), size),
             faiss.rev_swig_ptr(lists.get_codes(i), size * 4 * d).view(np.float32).reshape(size, d))
            for i in range(index.nlist) if (size := lists.list_size(i))
        )
    else:
        flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSWFlat) else index
        x = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
        blocks = ((np.arange(s, min(s + _CHECK_ROWS, n)), x[s : s + _CHECK_ROWS]) for s in range(0, n, _CHECK_ROWS))
    for ids, block in blocks:
        row = non_unit_row(block)
        if row is not None:
            return int(ids[row]), float(np.linalg.norm(block[row].astype(np.float64)))
    return None


def centroid_problem(index: faiss.IndexIVF) -> str | None:
    """What is wrong with an IVF index's centroids, or ``None``.

    The cluster centroids (spherical k-means over unit vectors) must be finite with norm <= 1: they choose
    the lists a query probes, and in IVF-PQ each is part of a reconstruction. IVF-PQ's sub-quantiser
    centroids, means of residual pieces of unit vectors, must be finite with norm <= 2. Only the
    reconstructions bound the scores (see :func:`non_unit_vector`); these bounds keep the unused parts sane.
    """
    coarse = all_vectors(faiss.downcast_index(index.quantizer))
    with np.errstate(all="ignore"):
        squared = np.einsum("ij,ij->i", coarse, coarse)
    if not (squared <= 1 + UNIT_NORM_TOLERANCE).all():  # NaN fails too
        return "a cluster centroid is not finite or longer than a unit vector"
    if not isinstance(index, faiss.IndexIVFPQ):
        return None
    pq = index.pq
    centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    with np.errstate(all="ignore"):
        squared = np.einsum("mkd,mkd->mk", centroids, centroids)
    if not (squared <= 4 + UNIT_NORM_TOLERANCE).all():
        return "a sub-quantiser centroid is not finite or longer than 2 (the longest residual of unit vectors)"
    return None


def non_unit_row(vectors: np.ndarray) -> int | None:
    """The first row of ``vectors`` that is not a finite unit vector (within :data:`UNIT_NORM_TOLERANCE`), or None."""
    for start in range(0, len(vectors), _CHECK_ROWS):
        block = vectors[start : start + _CHECK_ROWS]
        with np.errstate(all="ignore"):
            squared = np.einsum("ij,ij->i", block, block)
        bad = np.flatnonzero(~(np.abs(squared - 1) <= UNIT_NORM_TOLERANCE))  # NaN fails too
        if len(bad):
            return start + int(bad[0])
    return None

