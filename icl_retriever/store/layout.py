"""The byte layout of the FAISS files this library writes, checked before FAISS reads a byte of them."""

from __future__ import annotations

import struct
from pathlib import Path

import faiss
import numpy as np

from icl_retriever.errors import IndexFormatError

#: FAISS four-character codes we accept, and the index type each one is: flat inner-product, HNSW over
#: flat storage, IVF with flat lists, IVF with product-quantised lists. Anything else is refused before
#: FAISS parses it.
_FAISS_FOURCC = {b"IxFI": "flat", b"IHNf": "hnsw", b"IwFl": "ivf", b"IwPQ": "ivfpq"}
#: IVF-PQ as this library writes it: 8-bit codes, so 256 centroids per sub-quantiser.
_PQ_NBITS = 8
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")  # fourcc, d, ntotal, 2 dummies, is_trained, metric, float count
_INDEX_HEADER = struct.Struct("<4siqqq?i")  # the part every FAISS index type starts with


def index_kind(data: bytes) -> str | None:
    """The index type a FAISS file's four-character code says (``"flat"``, ``"hnsw"``, ``"ivf"``,
    ``"ivfpq"``), or ``None``."""
    return _FAISS_FOURCC.get(data[:4]) if len(data) >= _FLAT_HEADER.size else None


def check_layout(file: Path, data: bytes, kind: str, dim: int, count: int, pq_m: int | None = None) -> None:
    """Check a whole FAISS file of ``kind`` holding ``count`` vectors of ``dim`` (see :class:`_Layout`);
    ``pq_m``: the sub-quantisers an IVF-PQ file must have. ``data`` may be a memory map of the file."""
    if kind == "flat":
        check_flat_header(file, data, dim, count)
    else:
        _Layout(file, data).check(kind, dim, count, pq_m)


def check_flat_header(file: Path, data: bytes, dim: int, count: int) -> None:
    """A flat index file is its header and ``count`` x ``dim`` floats, nothing else."""
    if len(data) < _FLAT_HEADER.size or data[:4] != b"IxFI":
        raise IndexFormatError(f"{file}: not a flat FAISS index (header {data[:4]!r})")
    _, d, ntotal, _, _, _, metric, nfloats = _FLAT_HEADER.unpack_from(data)
    if (d, ntotal) != (dim, count) or nfloats != d * ntotal or len(data) != _FLAT_HEADER.size + 4 * d * ntotal:
        raise IndexFormatError(f"{file}: holds {ntotal} vectors of dim {d} in {len(data)} bytes, manifest says {count} of dim {dim}")
    if metric != faiss.METRIC_INNER_PRODUCT:
        raise IndexFormatError(f"{file}: not an inner-product index (metric {metric})")


class _Layout:
    """A walk over an HNSW / IVF file as FAISS writes them, before FAISS reads it.

    FAISS trusts the lengths stored in a file (it would allocate terabytes for a flipped bit, or zero-fill
    for minutes) and follows a nested index wherever it leads, including on-disk inverted lists that name
    another file to open. So every length is checked against the bytes that are left, every part must be
    the one this library writes (flat inner-product storage or clusters, in-memory lists), and the parts
    must end exactly at the end of the file.
    """

    def __init__(self, file: Path, data: bytes) -> None:
        self.file, self.data, self.pos = file, memoryview(data), 0

    def take(self, size: int) -> memoryview:
        if size > len(self.data) - self.pos:
            raise IndexFormatError(f"{self.file}: cut short at byte {len(self.data)} ({size} more bytes expected)")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def vector(self, itemsize: int) -> memoryview:
        """A FAISS vector: its length (8 bytes), then its items."""
        start = self.pos
        (n,) = self.unpack("<Q")
        if n * itemsize > len(self.data) - self.pos:
            raise IndexFormatError(f"{self.file}: the length at byte {start} ({n}) runs past the end of the file")
        return self.take(n * itemsize)

    def header(self, fourcc: bytes, d: int, ntotal: int, what: str) -> None:
        start = self.pos
        code, hd, hn, _, _, is_trained, metric = self.unpack(_INDEX_HEADER.format)
        if code != fourcc:
            raise IndexFormatError(f"{self.file}: {what} at byte {start} is {code!r}, expected {fourcc!r}")
        if (hd, hn) != (d, ntotal):
            raise IndexFormatError(
                f"{self.file}: holds {hn} vectors of dim {hd} in {len(self.data)} bytes, manifest says {ntotal} of dim {d}"
                if start == 0 else f"{self.file}: {what} holds {hn} vectors of dim {hd}, expected {ntotal} of dim {d}"
            )
        if metric != faiss.METRIC_INNER_PRODUCT or (hn and not is_trained):
            raise IndexFormatError(f"{self.file}: {what} is not a trained inner-product index (metric {metric})")

    def flat(self, d: int, ntotal: int, what: str) -> None:
        self.header(b"IxFI", d, ntotal, what)
        if len(self.vector(4)) != 4 * d * ntotal:
            raise IndexFormatError(f"{self.file}: {what} does not hold {ntotal} vectors of dim {d}")

    def check(self, kind: str, d: int, ntotal: int, pq_m: int | None = None) -> None:
        if kind == "hnsw":
            self.header(b"IHNf", d, ntotal, "the index")
            for itemsize in (8, 4, 4, 8, 4):  # assign_probas, cum_nneighbor_per_level, levels, offsets, neighbors
                self.vector(itemsize)
            self.take(20)  # entry_point, max_level, efConstruction, efSearch, upper_beam
            self.flat(d, ntotal, "the vector storage")
        else:
            self.header(b"IwFl" if kind == "ivf" else b"IwPQ", d, ntotal, "the index")
            nlist, _ = self.unpack("<QQ")  # nlist, nprobe
            self.flat(d, nlist, "the cluster centroids")
            (map_type,) = self.unpack("<b")
            self.vector(8)  # the id -> list position map (rebuilt after loading)
            if map_type == 2:
                self.vector(16)
            code_size = 4 * d
            if kind == "ivfpq":
                code_size = self.product_quantizer(d, pq_m)
            code, lists, list_code_size = self.unpack("<4sQQ")
            if (code, lists, list_code_size) != (b"ilar", nlist, code_size):
                raise IndexFormatError(
                    f"{self.file}: the inverted lists are not {nlist} in-memory lists of {code_size}-byte codes"
                )
            layout = bytes(self.take(4))
            sizes = np.frombuffer(self.vector(8), dtype="<u8")
            if layout == b"sprs":
                sizes = sizes[1::2]
            elif layout != b"full" or len(sizes) != nlist:
                raise IndexFormatError(f"{self.file}: the inverted lists' sizes are not readable")
            if (sizes > ntotal).any():
                raise IndexFormatError(f"{self.file}: an inverted list is longer than the index")
            self.take(int(sizes.sum()) * (code_size + 8))  # codes and ids of every list
        if self.pos != len(self.data):
            raise IndexFormatError(f"{self.file}: {len(self.data) - self.pos} bytes after the end of the index")

    def product_quantizer(self, d: int, pq_m: int | None) -> int:
        """The IVF-PQ part after the direct map: residual flag, code size and the quantiser; its code size."""
        by_residual, code_size = self.unpack("<bQ")
        pd, m, nbits = self.unpack("<QQQ")
        if (pd, nbits) != (d, _PQ_NBITS) or m != pq_m or code_size != m or by_residual != 1:
            raise IndexFormatError(
                f"{self.file}: the product quantiser has {m} sub-quantisers of {nbits} bits over dim {pd}, the "
                f"manifest says {pq_m} of {_PQ_NBITS} bits over dim {d}"
            )
        if len(self.vector(4)) != 4 * d * (1 << nbits):
            raise IndexFormatError(f"{self.file}: the product quantiser does not hold {1 << nbits} centroids per part")
        return int(code_size)

