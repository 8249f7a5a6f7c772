"""FAISS indexes as this library builds them: flat, HNSW or IVF over inner product, and search.

An index is described by its type and :class:`~icl_retriever.store.manifest.IndexParams`; updates rebuild
it with the same ones. Stored vectors are unit vectors (cosine = inner product): :func:`non_unit_vector`
finds one that is not, reading FAISS's storage in place.
"""

from __future__ import annotations

import faiss
import numpy as np

from icl_retriever.store.manifest import PARAMS_OF, IndexParams, IndexType

#: ``auto`` index type: exact search below this many demos, HNSW from here on.
AUTO_HNSW_FROM = 200_000
#: Defaults of the approximate index types (IVF's nlist defaults to :func:`default_nlist`).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32
_ADD_BLOCK = 20_000  # vectors per add() call while building an approximate index (progress granularity)
#: A stored vector is a unit vector: its squared norm is 1 within this (float32 round-off is ~1e-6).
UNIT_NORM_TOLERANCE = 1e-3
_CHECK_ROWS = 65_536  # rows per block of the norm check (bounded temporary memory)


def new_flat_index(vectors: np.ndarray, dim: int | None = None) -> faiss.Index:
    """Exact inner-product index (cosine, since rows are normalised)."""
    index = faiss.IndexFlatIP(int(dim if dim is not None else vectors.shape[1]))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def all_vectors(index: faiss.Index) -> np.ndarray:
    """Every stored vector, in id order."""
    if index.ntotal == 0:
        return np.empty((0, index.d), dtype=np.float32)
    return index.reconstruct_n(0, index.ntotal)


def default_nlist(n: int) -> int:
    """IVF clusters for ``n`` vectors: about sqrt(n), with at least 39 training points per cluster."""
    return max(1, min(round(float(np.sqrt(n))), n // 39))


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
            ``nlist`` (default :func:`default_nlist`, capped at the vector count) and ``nprobe``. Fields
            of other index types must be unset.
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
    elif index_type == "ivf":
        n = len(vectors)
        # FAISS's k-means wants >= 39 training points per cluster: a small pool gets fewer clusters.
        nlist = max(1, min(p.nlist or default_nlist(n), n // 39)) if n else (p.nlist or 1)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(p.nprobe or IVF_NPROBE, nlist)
        index.set_direct_map_type(faiss.DirectMap.Array)  # so stored vectors can be read back for updates
        if n:
            sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
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
    if isinstance(index, faiss.IndexFlat):
        return "flat", IndexParams()
    raise ValueError(f"unsupported FAISS index class {type(index).__name__}")


def rebuild_index(index: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """A new index of the same type and parameters as ``index``, holding ``vectors`` (for add / remove).

    Cost: flat is a copy; HNSW rebuilds its graph (on 2 cores roughly 1-3k vectors/s); IVF keeps
    ``nlist`` (capped at the new count) and retrains its clusters.
    """
    index_type, params = describe_index(index)
    return new_index(vectors, index_type, params, dim=index.d)


def configure_index(index: faiss.Index, params: IndexParams) -> None:
    """Apply the search-time parameters (HNSW ``ef_search``, IVF ``nprobe``) to a loaded index."""
    if isinstance(index, faiss.IndexHNSWFlat) and params.ef_search:
        index.hnsw.efSearch = params.ef_search
    elif isinstance(index, faiss.IndexIVFFlat) and params.nprobe:
        index.nprobe = params.nprobe


def search(index: faiss.Index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, with a single query run on one OpenMP thread.

    FAISS parallelises over queries; for one query the extra threads only add synchronisation (2
    threads measured 4-5x slower than 1 on a 2-core machine). OpenMP's thread count is a per-thread
    setting, so this does not affect searches running concurrently in other threads.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) != 1:
        return index.search(x, k)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(x, k)
    finally:
        faiss.omp_set_num_threads(before)


def non_unit_vector(index: faiss.Index) -> tuple[int, float] | None:
    """``(id, norm)`` of the first stored vector that is not a finite unit vector, or ``None``.

    Reads FAISS's storage in place (no copy of a large index), a block at a time.
    """
    d, n = index.d, index.ntotal
    if n == 0:
        return None
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

