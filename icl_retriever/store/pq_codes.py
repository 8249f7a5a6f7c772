"""IVF-PQ codes as the vectors they stand for: the norm of every stored code's reconstruction, in bounded memory.

An IVF-PQ index stores, per demo, a cluster number and ``pq_m`` one-byte codes; the demo's vector is the
cluster centroid plus one sub-quantiser centroid per code (the residual). FAISS scores a query against
that reconstruction, so a file that makes a reconstruction long (a centroid pushed to the edge of any
per-centroid bound and given to one demo everywhere) makes that demo win every query. What bounds the
scores is the reconstructions themselves, so every one is measured at load, without decoding it:

    |c + r|^2 = |c|^2 + sum_m (|r_m[code_m]|^2 + 2 <c_m, r_m[code_m]>)

a table of ``pq_m x 256`` terms per cluster and ``pq_m`` look-ups per demo.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

#: Norms a reconstruction of a unit vector may have. Measured on indexes this library builds (pq_m from 1 to
#: 96, dim 8 to 384, clustered and isotropic data, 300 to 20,000 vectors): 0.19 to 1.08; k-means codebooks
#: shrink a vector on average (the error is orthogonal to the reconstruction), so long ones are rare. Above
#: the range a code would lend its demo weight in the approximate search; at zero it has no direction.
PQ_NORM_RANGE = (0.1, 1.25)
_CODE_ROWS = 8192  # codes per block of the check (a transposed copy of pq_m bytes each: 0.75 MiB at pq_m = 96)
_TABLE_LISTS = 64  # clusters whose tables are computed at once (64 x pq_m x 256 floats: 12 MiB at pq_m = 96)


def reconstruction_norms(index: faiss.IndexIVFPQ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, norms)`` of the reconstructions of every stored code, a block of one inverted list at a time.

    Reads the lists in place (memory-mapped ones too) and never holds more than a block; NaN or infinite
    centroids give NaN or infinite norms.
    """
    pq = index.pq
    m, ksub, dsub = int(pq.M), int(pq.ksub), int(pq.dsub)
    centroids = faiss.vector_to_array(pq.centroids).astype(np.float64).reshape(m, ksub, dsub)
    quantizer = faiss.downcast_index(index.quantizer)
    lists = index.invlists
    with np.errstate(all="ignore"):
        squared = np.einsum("mkd,mkd->mk", centroids, centroids)
        for first in range(0, index.nlist, _TABLE_LISTS):
            chunk = range(first, min(first + _TABLE_LISTS, index.nlist))
            coarse = quantizer.reconstruct_n(first, len(chunk)).astype(np.float64)  # (lists, d)
            # tables[l, i, j] = |r_ij|^2 + 2 <c_l piece i, r_ij>, for a chunk of clusters in one batched product
            pieces = coarse.reshape(len(chunk), m, dsub).transpose(1, 2, 0)  # (m, dsub, lists)
            tables = np.ascontiguousarray((2 * (centroids @ pieces)).transpose(2, 0, 1)) + squared
            bases = np.einsum("ld,ld->l", coarse, coarse)
            for list_no, table, base in zip(chunk, tables, bases, strict=True):
                size = lists.list_size(list_no)
                if not size:
                    continue
                codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * m).reshape(size, m)
                ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
                for start in range(0, size, _CODE_ROWS):
                    columns = codes[start : start + _CODE_ROWS].T.copy()  # one row of codes per sub-quantiser
                    total = np.full(len(columns[0]), base)
                    for part, column in zip(table, columns, strict=True):
                        total += part.take(column)  # 256-entry look-ups: cheaper than one fancy index of all
                    yield ids[start : start + _CODE_ROWS], np.sqrt(np.maximum(total, 0.0))


def pq_out_of_range(index: faiss.IndexIVFPQ) -> tuple[int, float] | None:
    """``(id, norm)`` of the first stored code whose reconstruction's norm is outside :data:`PQ_NORM_RANGE`
    (or not finite), or ``None``."""
    low, high = PQ_NORM_RANGE
    for ids, norms in reconstruction_norms(index):
        bad = np.flatnonzero(~((norms >= low) & (norms <= high)))  # NaN fails too
        if len(bad):
            return int(ids[bad[0]]), float(norms[bad[0]])
    return None
