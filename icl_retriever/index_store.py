"""The index on disk: one directory with a JSON manifest, a FAISS index and the demos as JSONL.

Save and load are mirror images over one directory. Nothing on the load path can execute code: the
manifest and records are JSON, and the vectors are FAISS's own format, opened only after the file's
size, sha256 and header agree with the manifest.

An index may come from a stranger, who can recompute every sha256, so loading also checks what the
files hold: only regular files are opened, every stored vector is a finite unit vector, ids are unique
and instructions non-empty, counts agree, nothing refers to another file, and any error from the OS or
FAISS is an :class:`IndexFormatError` naming the file. :func:`trusted_model` decides which model a
manifest may name.

Crash safety: ``manifest.json`` is the commit record. Data files carry a per-version token in their
names (``index.<token>.faiss``, ``demos.<token>.jsonl``); a write puts the new version's files beside
the old ones, then switches ``manifest.json`` with one atomic rename, then deletes what the manifest no
longer names. A process killed at any moment leaves the old or the new version, both loadable. A new
index is assembled in a temporary sibling directory and renamed into place. Writers are serialised
with a file lock; readers need none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, NamedTuple

import faiss
import numpy as np
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icl_retriever._version import __version__
from icl_retriever.encoder import EncoderConfig
from icl_retriever.errors import IndexExistsError, IndexFormatError, IndexWriteError, ModelLoadError
from icl_retriever.records import Demo, check_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS = "vectors"
DEMOS = "demos"
#: Optional role: plain (topic) embeddings of instruction + input, row i for demo i, as a flat index.
TOPIC = "topic"
_SUFFIX = {VECTORS: ".faiss", DEMOS: ".jsonl", TOPIC: ".faiss"}
_DATA_PREFIX = {VECTORS: "index.", DEMOS: "demos.", TOPIC: "topic."}
#: FAISS four-character codes we accept, and the index type each one is: flat inner-product, HNSW over
#: flat storage, IVF with flat lists. Anything else is refused before FAISS parses it.
_FAISS_FOURCC = {b"IxFI": "flat", b"IHNf": "hnsw", b"IwFl": "ivf"}
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")  # fourcc, d, ntotal, 2 dummies, is_trained, metric, float count
_INDEX_HEADER = struct.Struct("<4siqqq?i")  # the part every FAISS index type starts with
#: ``auto`` index type: exact search below this many demos, HNSW from here on.
AUTO_HNSW_FROM = 200_000
#: recall@10 an approximate index aims for when ``ef_search`` / ``nprobe`` are tuned at build time.
TARGET_RECALL = 0.95

IndexType = Literal["flat", "hnsw", "ivf"]
_LOAD_RETRIES = 5


class FileEntry(BaseModel):
    """One data file of the current version: its name, size and hash, checked at load."""

    model_config = ConfigDict(extra="forbid")

    name: str
    size: int
    sha256: str


class IndexParams(BaseModel):
    """Parameters of the vector index: HNSW's ``M`` / ``ef_construction`` / ``ef_search``, IVF's
    ``nlist`` / ``nprobe``; empty for flat. ``ef_search`` and ``nprobe`` are applied at load."""

    model_config = ConfigDict(extra="forbid")

    M: int | None = Field(None, ge=2, le=1024, description="HNSW: links per node (2 M on the bottom layer)")
    ef_construction: int | None = Field(None, ge=1, description="HNSW: candidate list size while building")
    ef_search: int | None = Field(None, ge=1, description="HNSW: candidate list size while searching")
    nlist: int | None = Field(None, ge=1, description="IVF: number of clusters")
    nprobe: int | None = Field(None, ge=1, description="IVF: clusters visited per search")


#: Which :class:`IndexParams` fields each index type has (all of them required, no others).
_PARAMS_OF: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe"),
}


class TopicInfo(BaseModel):
    """The topic vectors beside the PIE ones: which encoder made them (``rerank="task_then_topic"``).

    ``source`` is ``"base_model"`` when they come from the PIE model's base weights without PIE
    training (the default encoder: ``"default-base"``), ``"same_model_plain"`` when they come from the
    index's own model without its template (the fallback for any other model).
    """

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderConfig
    fingerprint: str
    source: Literal["base_model", "same_model_plain"]
    dim: int = Field(ge=1)


class Manifest(BaseModel):
    """What an index is: format, encoder identity, shape, version, and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(FORMAT_VERSION, strict=True, ge=1, le=FORMAT_VERSION)
    library_version: str = __version__
    created: datetime
    updated: datetime
    generation: int = 1
    encoder: EncoderConfig
    fingerprint: str
    dim: int
    count: int
    index_type: IndexType = "flat"
    index_params: IndexParams = Field(default_factory=IndexParams)
    recall_at_10: float | None = Field(
        None, ge=0.0, le=1.0, description="approximate index: share of the exact top 10 it returns (sampled at build)"
    )
    metric: Literal["inner_product"] = "inner_product"
    topic: TopicInfo | None = None
    files: dict[Literal["vectors", "demos", "topic"], FileEntry]


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


# index types --------------------------------------------------------------------------------

#: Defaults of the approximate index types (IVF's nlist defaults to :func:`default_nlist`).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32
_ADD_BLOCK = 20_000  # vectors per add() call while building an approximate index (progress granularity)
_MAX_EF_SEARCH = 1024


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
    stray = [name for name, value in p if value is not None and name not in _PARAMS_OF[index_type]]
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
        raise ValueError(f"unknown index type {index_type!r}; expected one of {sorted(_PARAMS_OF)}")
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


# writing ------------------------------------------------------------------------------------


@contextmanager
def write_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    """Serialise writers of one index (the lock file sits beside the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=timeout):
        yield


def check_target(path: Path, *, force: bool) -> None:
    """Refuse to write over a file, a non-index directory, or an index without ``force``."""
    if path.is_file() or (path.is_symlink() and not path.is_dir()):
        raise IndexExistsError(f"{path}: exists and is a file, not an index directory")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST_FILE).is_file():
            raise IndexExistsError(f"{path}: exists and is not an index directory; refusing to overwrite it")
        if not force:
            raise IndexExistsError(f"{path}: an index already exists there (use --force / force=True to replace it)")


def save_index(
    path: str | Path,
    vectors_index: faiss.Index,
    demos: list[Demo],
    *,
    encoder_config: EncoderConfig,
    fingerprint: str,
    force: bool = False,
    recall_at_10: float | None = None,
    topic_index: faiss.Index | None = None,
    topic: TopicInfo | None = None,
) -> Manifest:
    """Write an index directory atomically (under the write lock) and return its manifest.

    Args:
        recall_at_10: an approximate index's measured recall (measured here when not given).

    Raises:
        IndexExistsError: ``path`` holds something and ``force`` is not set (or it is not an index).
    """
    path = Path(path)
    with write_lock(path):
        return write_version(
            path, vectors_index, demos, encoder_config=encoder_config, fingerprint=fingerprint, force=force,
            recall_at_10=recall_at_10, topic_index=topic_index, topic=topic,
        )


def write_version(
    path: Path,
    vectors_index: faiss.Index,
    demos: list[Demo],
    *,
    encoder_config: EncoderConfig,
    fingerprint: str,
    force: bool = False,
    previous: Manifest | None = None,
    recall_at_10: float | None = None,
    topic_index: faiss.Index | None = None,
    topic: TopicInfo | None = None,
) -> Manifest:
    """Write one version of an index; the caller holds :func:`write_lock`.

    Args:
        force: replace an index that exists at ``path``.
        previous: the manifest this version updates (keeps its created time, bumps its generation).
        recall_at_10: an approximate index's recall@10; measured here (about 1000 queries) when not given.
        topic_index, topic: optional topic vectors (a flat index, row i for demo i) and what made them.
    """
    check_target(path, force=force or previous is not None)
    if (topic_index is None) != (topic is None):
        raise ValueError("topic_index and topic go together: give both or neither")
    if topic_index is not None and topic is not None and (topic_index.ntotal, topic_index.d) != (len(demos), topic.dim):
        raise ValueError(
            f"topic index holds {topic_index.ntotal} vectors of dim {topic_index.d}, expected {len(demos)} of dim {topic.dim}"
        )
    index_type, index_params = describe_index(vectors_index)
    for role, index in ((VECTORS, vectors_index), (TOPIC, topic_index)):
        bad = _non_unit_vector(index) if index is not None else None
        if bad is not None:  # the loader would refuse it: never write it
            raise ValueError(f"{role} vector {bad[0]} has norm {bad[1]:.4g}; stored vectors must be unit vectors")
    if recall_at_10 is None:
        recall_at_10 = measure_recall(vectors_index)
    now = datetime.now(timezone.utc)
    if previous is None and (path / MANIFEST_FILE).is_file():
        previous = _try_manifest(path)  # a forced rebuild continues the generation count
    base = dict(created=now, generation=1) if previous is None else dict(
        created=previous.created, generation=previous.generation + 1
    )
    fresh = not path.exists()
    workdir = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}" if fresh else path
    token = uuid.uuid4().hex[:12]
    written: list[Path] = []
    committed = False

    def write(role: str, chunks: Iterable[bytes]) -> FileEntry:
        file = workdir / f"{_DATA_PREFIX[role]}{token}{_SUFFIX[role]}"
        written.append(file)
        return _write_file(file, chunks)

    try:
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            workdir.mkdir()
        # vectors, serialised by FAISS and written by us (so a full disk is an OSError naming the file)
        files = {VECTORS: write(VECTORS, [faiss.serialize_index(vectors_index).data])}
        # demos, one JSON object per line, in index order
        files[DEMOS] = write(DEMOS, ((json.dumps(d.record(), ensure_ascii=False) + "\n").encode() for d in demos))
        # topic vectors (optional), a flat index in the same row order
        if topic_index is not None:
            files[TOPIC] = write(TOPIC, [faiss.serialize_index(topic_index).data])
        # manifest last: it vouches for the files above and switches to them in one rename
        manifest = Manifest(
            **base,
            updated=now,
            encoder=encoder_config,
            fingerprint=fingerprint,
            dim=int(vectors_index.d),
            count=len(demos),
            index_type=index_type,
            index_params=index_params,
            recall_at_10=recall_at_10,
            topic=topic,
            files=files,
        )
        for file in written:
            _fsync(file)
        staged = workdir / f".{MANIFEST_FILE}.{token}"
        written.append(staged)
        _write_file(staged, [(manifest.model_dump_json(indent=2) + "\n").encode()])
        _fsync(staged)
        os.replace(staged, workdir / MANIFEST_FILE)
        committed = not fresh
        _fsync(workdir)
        if fresh:
            os.rename(workdir, path)
            committed = True
            _fsync(path.parent)
    except BaseException as exc:
        if committed:  # the new version is in place: its files must stay
            raise
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for file in written:
                file.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            raise IndexWriteError(
                f"{path}: {'index not created' if fresh else 'index unchanged'}: "
                f"{exc.strerror or exc}{where}"
            ) from exc
        raise
    _remove_unreferenced(path, manifest)
    return manifest


def _write_file(file: Path, chunks: Iterable[bytes]) -> FileEntry:
    """Create ``file`` from ``chunks``, hashing them on the way: every byte of an index is written here."""
    digest, size = hashlib.sha256(), 0
    with file.open("xb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(name=file.name, size=size, sha256=digest.hexdigest())


def _remove_unreferenced(path: Path, manifest: Manifest) -> None:
    """Delete data files of older versions and leftovers of writers that were killed.

    Best effort, after the commit: only files and links are removed (a directory or FIFO that happens to
    be named like a data file is not ours and is left alone), and a failure is a warning, not an error.
    """
    keep = {entry.name for entry in manifest.files.values()}
    try:
        for child in path.iterdir():
            stale_data = any(child.name.startswith(_DATA_PREFIX[r]) and child.name.endswith(_SUFFIX[r]) for r in _SUFFIX)
            stale_manifest = child.name.startswith(f".{MANIFEST_FILE}.")
            if (stale_data or stale_manifest) and child.name not in keep:
                mode = child.lstat().st_mode
                if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    child.unlink(missing_ok=True)
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("%s: the new version is written, but an old file could not be removed (%s)", path, exc)


# reading ------------------------------------------------------------------------------------

#: A manifest is a few KB; a far larger file is not one (and is not read into memory).
_MAX_MANIFEST_BYTES = 1 << 20
#: Data file names as this library writes them (``index.<token>.faiss``): no separators, NUL or spaces.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A stored vector is a unit vector: its squared norm is 1 within this (float32 round-off is ~1e-6).
UNIT_NORM_TOLERANCE = 1e-3
_CHECK_ROWS = 65_536  # rows per block of the norm check (bounded temporary memory)
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link",
               stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate ``path/manifest.json``.

    Raises:
        IndexFormatError: the directory or manifest is missing, unreadable, invalid or too new.
    """
    path = Path(path)
    if not path.exists():
        raise IndexFormatError(f"{path}: no such index directory")
    if not path.is_dir():
        raise IndexFormatError(f"{path}: is a file, expected an index directory")
    manifest_path = path / MANIFEST_FILE
    if not os.path.lexists(manifest_path):
        raise IndexFormatError(f"{manifest_path}: missing; {path} is not an icl-retriever index")
    with _reading(manifest_path):
        data = _read_regular(manifest_path, limit=_MAX_MANIFEST_BYTES)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{manifest_path}: not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{manifest_path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path}: index format version {version} is newer than this library supports "
            f"({FORMAT_VERSION}); upgrade icl-retriever"
        )
    try:
        manifest = Manifest.model_validate(raw)
        check_text(manifest.model_dump(mode="json"), "the manifest")
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise IndexFormatError(f"{manifest_path}: field '{field}': {first['msg']}") from exc
    except ValueError as exc:
        raise IndexFormatError(f"{manifest_path}: {exc}") from None
    for role in (VECTORS, DEMOS):
        if role not in manifest.files:
            raise IndexFormatError(f"{manifest_path}: field 'files.{role}': missing")
    for role, entry in manifest.files.items():
        if not _FILE_NAME.fullmatch(entry.name) or not entry.name.endswith(_SUFFIX[role]):
            raise IndexFormatError(f"{manifest_path}: field 'files.{role}.name': {entry.name!r} is not a {role} file name")
    if manifest.count < 0 or manifest.dim < 1:
        raise IndexFormatError(f"{manifest_path}: count {manifest.count} / dim {manifest.dim} out of range")
    if (TOPIC in manifest.files) != (manifest.topic is not None):
        raise IndexFormatError(f"{manifest_path}: field 'topic' and 'files.topic' must be both present or both absent")
    wanted = set(_PARAMS_OF[manifest.index_type])
    given = {name for name, value in manifest.index_params if value is not None}
    if given != wanted:
        raise IndexFormatError(
            f"{manifest_path}: field 'index_params': a {manifest.index_type} index has parameters "
            f"{sorted(wanted) or 'none'}, the manifest gives {sorted(given) or 'none'}"
        )
    return manifest


def trusted_model(path: str | Path, model: str) -> str:
    """The model a manifest names, if it may be loaded on the manifest's word alone.

    That is the embedded default (``"default"``, ``"default-base"``) or a directory that exists inside the
    index directory (a path relative to it, or an absolute one that resolves inside it). A manifest can name
    any other local path or Hugging Face id; loading that is the caller's decision, not the index's.

    Returns:
        The model to load: the default's name, or the absolute path of the directory inside the index.

    Raises:
        ModelLoadError: any other model, with how to pass it explicitly.
    """
    if model in ("default", "default-base"):
        return model
    root = Path(path).resolve()
    try:
        candidate = (root / model).resolve()  # an absolute ``model`` replaces ``root``
    except (OSError, ValueError):
        candidate = root
    if candidate != root and candidate.is_relative_to(root) and candidate.is_dir():
        return str(candidate)
    raise ModelLoadError(
        f"{path}: the manifest names model {model!r}, which is neither the embedded default nor a directory inside "
        "the index, so it is not loaded on the manifest's word; if you trust it, pass it: "
        "Retriever.from_index(path, model=...) (or encoder=...), or --model on the command line"
    )


def load_index(path: str | Path, *, verify: bool = True) -> tuple[Manifest, faiss.Index, list[Demo]]:
    """Read the current version of an index directory, checking each file before parsing it.

    A writer may switch versions while we read; then the files we were about to open are gone and
    we start again from the new manifest.

    Args:
        verify: check data files' sha256 (sizes, headers, shapes and contents are always checked).

    Raises:
        IndexFormatError: a file is missing, truncated, corrupted, disagrees with the manifest, or holds
            what this library never writes (vectors that are not unit vectors, duplicate ids, ...).
    """
    version = load_version(path, verify=verify, topic=False)
    return version.manifest, version.index, version.demos


class IndexVersion(NamedTuple):
    """One consistent version of an index directory, as :func:`load_version` reads it."""

    manifest: Manifest
    index: faiss.Index
    demos: list[Demo]
    topic: faiss.Index | None  # the topic vectors; None when the index has none or they were not asked for


def load_version(path: str | Path, *, verify: bool = True, topic: bool = True) -> IndexVersion:
    """:func:`load_index`, plus the topic vectors of the same version when ``topic`` and the index has them."""
    path = Path(path)
    for attempt in range(_LOAD_RETRIES):
        manifest = load_manifest(path)
        try:
            index = _read_vectors(path, manifest, verify)
            demos = _read_demos(path, manifest, verify)
            topic_index = _read_topic(path, manifest, verify) if topic and manifest.topic is not None else None
            return IndexVersion(manifest, index, demos, topic_index)
        except IndexFormatError:
            if attempt + 1 < _LOAD_RETRIES and _try_manifest(path) != manifest:
                continue  # replaced under our feet: read the new version
            raise
    raise AssertionError("unreachable")


def _try_manifest(path: Path) -> Manifest | None:
    try:
        return load_manifest(path)
    except IndexFormatError:
        return None


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """Any error from the OS or FAISS while reading ``file`` becomes an :class:`IndexFormatError` naming it."""
    try:
        yield
    except (OSError, RuntimeError, MemoryError, ValueError, OverflowError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise IndexFormatError(f"{file}: cannot be read ({type(exc).__name__}{': ' + reason if reason else ''})") from exc


def _read_vectors(path: Path, manifest: Manifest, verify: bool) -> faiss.Index:
    file = path / manifest.files[VECTORS].name
    with _reading(file):
        data = _read_checked(file, manifest.files[VECTORS], verify)
        kind = _FAISS_FOURCC.get(data[:4]) if len(data) >= _FLAT_HEADER.size else None
        if kind is None:
            raise IndexFormatError(f"{file}: not a FAISS index of a supported type (header {data[:4]!r})")
        if kind != manifest.index_type:
            raise IndexFormatError(f"{file}: holds a {kind} index, manifest says {manifest.index_type}")
        if kind == "flat":
            _check_flat_header(file, data, manifest.dim, manifest.count)
        else:
            _Layout(file, data).check(kind, manifest.dim, manifest.count)
        index = _deserialize(file, data)
        del data
        if index.d != manifest.dim or index.ntotal != manifest.count:
            raise IndexFormatError(
                f"{file}: holds {index.ntotal} vectors of dim {index.d}, manifest says {manifest.count} of dim {manifest.dim}"
            )
        try:
            kind, params = describe_index(index)
        except ValueError as exc:
            raise IndexFormatError(f"{file}: {exc}") from exc
        build_params = {"ef_search", "nprobe"}  # search-time settings: the manifest's apply
        if kind != manifest.index_type or params.model_dump(exclude=build_params) != manifest.index_params.model_dump(
            exclude=build_params
        ):
            raise IndexFormatError(
                f"{file}: is a {kind} index with {params.model_dump(exclude_none=True, exclude=build_params)}, manifest "
                f"says {manifest.index_type} with {manifest.index_params.model_dump(exclude_none=True, exclude=build_params)}"
            )
        _check_contents(file, index)
        configure_index(index, manifest.index_params)
        return index


def _read_topic(path: Path, manifest: Manifest, verify: bool) -> faiss.Index:
    """The topic vectors: a flat inner-product index with one row per demo."""
    assert manifest.topic is not None
    file = path / manifest.files[TOPIC].name
    with _reading(file):
        data = _read_checked(file, manifest.files[TOPIC], verify)
        _check_flat_header(file, data, manifest.topic.dim, manifest.count)
        index = _deserialize(file, data)
        del data
        if (index.d, index.ntotal) != (manifest.topic.dim, manifest.count):
            raise IndexFormatError(
                f"{file}: holds {index.ntotal} vectors of dim {index.d}, manifest says {manifest.count} of dim "
                f"{manifest.topic.dim}"
            )
        _check_contents(file, index)
        return index


def _check_flat_header(file: Path, data: bytes, dim: int, count: int) -> None:
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

    def check(self, kind: str, d: int, ntotal: int) -> None:
        if kind == "hnsw":
            self.header(b"IHNf", d, ntotal, "the index")
            for itemsize in (8, 4, 4, 8, 4):  # assign_probas, cum_nneighbor_per_level, levels, offsets, neighbors
                self.vector(itemsize)
            self.take(20)  # entry_point, max_level, efConstruction, efSearch, upper_beam
            self.flat(d, ntotal, "the vector storage")
        else:
            self.header(b"IwFl", d, ntotal, "the index")
            nlist, _ = self.unpack("<QQ")  # nlist, nprobe
            self.flat(d, nlist, "the cluster centroids")
            (map_type,) = self.unpack("<b")
            self.vector(8)  # the id -> list position map (rebuilt after loading)
            if map_type == 2:
                self.vector(16)
            code, lists, code_size = self.unpack("<4sQQ")
            if (code, lists, code_size) != (b"ilar", nlist, 4 * d):
                raise IndexFormatError(f"{self.file}: the inverted lists are not {nlist} in-memory lists of dim {d}")
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


def _deserialize(file: Path, data: bytes) -> faiss.Index:
    """FAISS's reader, over bytes whose layout is already checked."""
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except (RuntimeError, MemoryError) as exc:
        raise IndexFormatError(f"{file}: not a readable FAISS index ({(str(exc).splitlines() or [''])[0]})") from exc


def _check_contents(file: Path, index: faiss.Index) -> None:
    """What a self-consistent but hostile index could still get wrong: the parts of an approximate index
    must fit together, each id must be stored once, and every vector must be a finite unit vector (a
    scaled row would win unrelated queries; a NaN row could never be returned)."""
    if isinstance(index, faiss.IndexHNSWFlat):
        storage = faiss.downcast_index(index.storage)
        if not isinstance(storage, faiss.IndexFlat) or (storage.ntotal, storage.d, storage.metric_type) != (
            index.ntotal, index.d, faiss.METRIC_INNER_PRODUCT
        ):
            raise IndexFormatError(f"{file}: the HNSW graph's vector storage does not match the index")
    elif isinstance(index, faiss.IndexIVFFlat):
        quantizer = faiss.downcast_index(index.quantizer)
        lists = index.invlists
        if not isinstance(quantizer, faiss.IndexFlat) or (quantizer.ntotal, quantizer.d) != (index.nlist, index.d) or (
            lists.nlist, lists.code_size) != (index.nlist, 4 * index.d):
            raise IndexFormatError(f"{file}: the IVF clusters or lists do not match the index")
        # Rebuilding the id -> position map from the lists refuses ids outside [0, ntotal); a missing id stays -1.
        once = f"{file}: the IVF lists do not hold each of the ids 0..{index.ntotal - 1} exactly once"
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        try:
            index.set_direct_map_type(faiss.DirectMap.Array)
        except RuntimeError as exc:
            raise IndexFormatError(once) from exc
        stored = sum(lists.list_size(i) for i in range(index.nlist))
        if stored != index.ntotal or (index.ntotal and faiss.vector_to_array(index.direct_map.array).min() < 0):
            raise IndexFormatError(once)
    bad = _non_unit_vector(index)
    if bad is not None:
        raise IndexFormatError(
            f"{file}: stored vector {bad[0]} has norm {bad[1]:.4g}, not 1 (vectors are unit vectors; a scaled, "
            "NaN or infinite one would distort every score)"
        )


def _non_unit_vector(index: faiss.Index) -> tuple[int, float] | None:
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


def _read_demos(path: Path, manifest: Manifest, verify: bool) -> list[Demo]:
    file = path / manifest.files[DEMOS].name
    with _reading(file):
        data = _read_checked(file, manifest.files[DEMOS], verify)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{file}: not valid UTF-8") from exc
    del data
    demos: list[Demo] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue  # the newline that ends the file
        try:
            demos.append(Demo.model_validate_json(line))  # refuses lone surrogates (the text rule) itself
        except ValidationError as exc:
            raise IndexFormatError(f"{file}:{lineno}: invalid demo record ({exc.errors()[0]['msg']})") from exc
        lines.append(lineno)
    if len(demos) != manifest.count:
        raise IndexFormatError(f"{file}: holds {len(demos)} demos, manifest says {manifest.count}")
    _check_demos(file, demos, lines)
    return demos


def _check_demos(file: Path, demos: list[Demo], lines: list[int]) -> None:
    """The rules a pool obeys (see records.demo_from_record), checked again: a publisher could skip them."""
    ids = [demo.id for demo in demos]
    if len(set(ids)) == len(ids) and all(map(str.strip, ids)) and all(demo.instruction.strip() for demo in demos):
        return  # the usual case, in C-speed passes; the loop below finds the line at fault
    seen: set[str] = set()
    for demo, lineno in zip(demos, lines, strict=True):
        if not demo.instruction.strip() or not demo.id.strip():
            raise IndexFormatError(f"{file}:{lineno}: empty {'id' if not demo.id.strip() else 'instruction'}")
        if demo.id in seen:
            raise IndexFormatError(f"{file}:{lineno}: duplicate id {demo.id!r}")
        seen.add(demo.id)


def _read_regular(file: Path, size: int | None = None, *, limit: int | None = None) -> bytes:
    """The bytes of ``file``, which must be a regular file of ``size`` (or at most ``limit``) bytes.

    A FIFO, device, socket, directory or symbolic link is refused before it is opened, and the open
    itself neither blocks nor follows a link (in case the entry was swapped in the meantime).
    """

    def check(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise IndexFormatError(f"{file}: is {kind}, expected a regular file")
        if size is not None and info.st_size != size:
            raise IndexFormatError(f"{file}: size {info.st_size} bytes, manifest says {size} (truncated or replaced?)")
        if limit is not None and info.st_size > limit:
            raise IndexFormatError(f"{file}: {info.st_size} bytes, too large to be what it claims")

    try:
        check(os.lstat(file))
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{file}: missing from the index directory") from exc
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(file, flags), "rb") as fh:
        check(os.fstat(fh.fileno()))
        return fh.read()


def _read_checked(file: Path, expected: FileEntry, verify: bool) -> bytes:
    """Read a data file whole after checking its type and size (and then its hash) against the manifest."""
    data = _read_regular(file, expected.size)
    if verify:
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise IndexFormatError(f"{file}: sha256 differs from the manifest (file corrupted or modified)")
    return data


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
