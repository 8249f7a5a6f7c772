"""The verified load: an index directory read back, each file checked before it is parsed.

Nothing on the load path can execute code: the manifest and records are JSON, and the vectors are
FAISS's own format, opened only after the file's size, sha256 and layout agree with the manifest.

An index may come from a stranger, who can recompute every sha256, so loading also checks what the
files hold: only regular files are opened, every stored vector is a finite unit vector, ids are unique
and instructions non-empty, counts agree, nothing refers to another file, and any error from the OS or
FAISS is an :class:`IndexFormatError` naming the file. :func:`trusted_model` decides which model a
manifest may name.
"""

from __future__ import annotations

import hashlib
import json
import mmap as mmap_module
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from pydantic import ValidationError

from icl_retriever import presets
from icl_retriever.errors import IndexFormatError, ModelLoadError
from icl_retriever.records import Demo, check_text
from icl_retriever.store.demo_file import OFFSET_DTYPE, MappedDemos
from icl_retriever.store.faiss_index import centroid_problem, configure_index, describe_index, non_unit_vector
from icl_retriever.store.layout import check_flat_header, check_layout, index_kind
from icl_retriever.store.manifest import (
    DEMOS,
    FORMAT_VERSION,
    MANIFEST_FILE,
    OFFSETS,
    TOPIC,
    VECTORS,
    FileEntry,
    Manifest,
    manifest_problem,
)
from icl_retriever.store.pq_codes import PQ_NORM_RANGE

_LOAD_RETRIES = 5
#: A manifest is a few KB; a far larger file is not one (and is not read into memory).
_MAX_MANIFEST_BYTES = 1 << 20
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
    problem = manifest_problem(manifest)
    if problem is not None:
        raise IndexFormatError(f"{manifest_path}: {problem}")
    return manifest


def trusted_model(path: str | Path, model: str) -> str:
    """The model a manifest names, if it may be loaded on the manifest's word alone.

    That is a packaged preset (:mod:`icl_retriever.presets`: ``"default"``, ``"ieb"``, ...) or a directory that exists inside the
    index directory (a path relative to it, or an absolute one that resolves inside it). A manifest can name
    any other local path or Hugging Face id; loading that is the caller's decision, not the index's.

    Returns:
        The model to load: the preset's name, or the absolute path of the directory inside the index.

    Raises:
        ModelLoadError: any other model, with how to pass it explicitly.
    """
    if presets.find(model) is not None:
        return model
    root = Path(path).resolve()
    try:
        candidate = (root / model).resolve()  # an absolute ``model`` replaces ``root``
    except (OSError, ValueError):
        candidate = root
    if candidate != root and candidate.is_relative_to(root) and candidate.is_dir():
        return str(candidate)
    raise ModelLoadError(
        f"{path}: the manifest names model {model!r}, which is neither a packaged preset nor a directory inside "
        "the index, so it is not loaded on the manifest's word; if you trust it, pass it: "
        "Retriever.from_index(path, model=...) (or encoder=...), or --model on the command line"
    )


def load_index(
    path: str | Path, *, verify: bool = True, mmap: bool = False
) -> tuple[Manifest, faiss.Index, Sequence[Demo]]:
    """Read the current version of an index directory, checking each file before parsing it.

    A writer may switch versions while we read; then the files we were about to open are gone and
    we start again from the new manifest.

    Args:
        verify: check data files' sha256 (sizes, headers, shapes and contents are always checked).
        mmap: search the vector files where they lie (memory-mapped) instead of reading them into memory:
            an index larger than RAM can be queried, pages are read on demand and shared between
            processes. The checks are the same, made over the mapped file. The demo records are
            mapped too (where the index has an offset table) and each is parsed and checked when read,
            so a query reads only the demos it returns (ids are not checked for uniqueness then).

    Raises:
        IndexFormatError: a file is missing, truncated, corrupted, disagrees with the manifest, or holds
            what this library never writes (vectors that are not unit vectors, duplicate ids, ...).
    """
    version = load_version(path, verify=verify, topic=False, mmap=mmap)
    return version.manifest, version.index, version.demos


class IndexVersion(NamedTuple):
    """One consistent version of an index directory, as :func:`load_version` reads it."""

    manifest: Manifest
    index: faiss.Index
    demos: Sequence[Demo]  # a list, or with mmap a MappedDemos that reads each record when asked
    topic: faiss.Index | None  # the topic vectors; None when the index has none or they were not asked for


def load_version(path: str | Path, *, verify: bool = True, topic: bool = True, mmap: bool = False) -> IndexVersion:
    """:func:`load_index`, plus the topic vectors of the same version when ``topic`` and the index has them."""
    path = Path(path)
    for attempt in range(_LOAD_RETRIES):
        manifest = load_manifest(path)
        try:
            index = _read_vectors(path, manifest, verify, mmap)
            demos = map_demos(path, manifest, verify) if mmap and OFFSETS in manifest.files else _read_demos(
                path, manifest, verify
            )
            topic_index = _read_topic(path, manifest, verify, mmap) if topic and manifest.topic is not None else None
            return IndexVersion(manifest, index, demos, topic_index)
        except IndexFormatError:
            if attempt + 1 < _LOAD_RETRIES and try_manifest(path) != manifest:
                continue  # replaced under our feet: read the new version
            raise
    raise AssertionError("unreachable")


def try_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or ``None`` where there is no valid one."""
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


def _read_vectors(path: Path, manifest: Manifest, verify: bool, mmap: bool = False) -> faiss.Index:
    file = path / manifest.files[VECTORS].name
    with _reading(file), _checked_bytes(file, manifest.files[VECTORS], verify, mmap) as data:
        kind = index_kind(data)
        if kind is None:
            raise IndexFormatError(f"{file}: not a FAISS index of a supported type (header {bytes(data[:4])!r})")
        if kind != manifest.index_type:
            raise IndexFormatError(f"{file}: holds a {kind} index, manifest says {manifest.index_type}")
        check_layout(file, data, kind, manifest.dim, manifest.count, manifest.index_params.pq_m)
        index = _open_index(file, data, kind, mmap)
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


def _read_topic(path: Path, manifest: Manifest, verify: bool, mmap: bool = False) -> faiss.Index:
    """The topic vectors: a flat inner-product index with one row per demo."""
    assert manifest.topic is not None
    file = path / manifest.files[TOPIC].name
    with _reading(file), _checked_bytes(file, manifest.files[TOPIC], verify, mmap) as data:
        check_flat_header(file, data, manifest.topic.dim, manifest.count)
        index = _open_index(file, data, "flat", mmap)
        if (index.d, index.ntotal) != (manifest.topic.dim, manifest.count):
            raise IndexFormatError(
                f"{file}: holds {index.ntotal} vectors of dim {index.d}, manifest says {manifest.count} of dim "
                f"{manifest.topic.dim}"
            )
        _check_contents(file, index)
        return index


@contextmanager
def _checked_bytes(file: Path, expected: FileEntry, verify: bool, mmap: bool) -> Iterator[bytes | mmap_module.mmap]:
    """A data file's bytes, or with ``mmap`` a read-only map of it, after its type, size and sha256 are checked."""
    if not mmap:
        yield _read_checked(file, expected, verify)
        return
    mapped = _map_checked(file, expected, verify)
    if mapped is None:
        raise IndexFormatError(f"{file}: empty")
    try:
        yield mapped
    finally:
        try:
            mapped.close()
        except BufferError:  # a traceback still holds a view of it; it is unmapped when that goes
            pass


def _map_checked(file: Path, expected: FileEntry, verify: bool) -> mmap_module.mmap | None:
    """A read-only map of a data file (``None`` if empty) after its type, size and sha256 are checked."""
    with _open_regular(file, expected.size) as fh:
        # hashed through reads, not the map: the pages stay in the OS cache, not in this process's memory
        if verify and hashlib.file_digest(fh, "sha256").hexdigest() != expected.sha256:
            raise IndexFormatError(f"{file}: sha256 differs from the manifest (file corrupted or modified)")
        if expected.size == 0:
            return None
        return mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ)


def _open_index(file: Path, data: bytes | mmap_module.mmap, kind: str, mmap: bool) -> faiss.Index:
    """FAISS's reader over a file whose layout is checked: from the bytes, or memory-mapped from the file.

    FAISS maps the file by its name, so the file must still be the one just checked: the data files of a
    version are written once and never changed in place, and its identity is compared before and after.
    """
    if not mmap:
        assert isinstance(data, bytes)
        return _deserialize(file, data)
    before = os.lstat(file)  # the file checked a moment ago through its descriptor, still in place
    identity = (before.st_ino, before.st_dev, before.st_size)
    if not stat.S_ISREG(before.st_mode):
        raise IndexFormatError(f"{file}: changed while it was being opened")
    flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if kind in ("ivf", "ivfpq") else faiss.IO_FLAG_MMAP_IFC)
    try:
        index = faiss.read_index(str(file), flags)
    except (RuntimeError, MemoryError) as exc:
        raise IndexFormatError(f"{file}: not a readable FAISS index ({(str(exc).splitlines() or [''])[0]})") from exc
    # the entry FAISS opened by name must still be the regular file that was checked, not a link swapped in
    after = os.lstat(file)
    if not stat.S_ISREG(after.st_mode) or (after.st_ino, after.st_dev, after.st_size) != identity:
        raise IndexFormatError(f"{file}: changed while it was being opened")
    return index


def _deserialize(file: Path, data: bytes) -> faiss.Index:
    """FAISS's reader, over bytes whose layout is already checked."""
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except (RuntimeError, MemoryError) as exc:
        raise IndexFormatError(f"{file}: not a readable FAISS index ({(str(exc).splitlines() or [''])[0]})") from exc


def _check_contents(file: Path, index: faiss.Index) -> None:
    """What a self-consistent but hostile index could still get wrong: the parts of an approximate index
    must fit together, each id must be stored once, and every vector must be a finite unit vector (a
    scaled row would win unrelated queries; a NaN row could never be returned); for IVF-PQ, every code's
    reconstruction must be near unit length, measured code by code in bounded memory."""
    if isinstance(index, faiss.IndexHNSWFlat):
        storage = faiss.downcast_index(index.storage)
        if not isinstance(storage, faiss.IndexFlat) or (storage.ntotal, storage.d, storage.metric_type) != (
            index.ntotal, index.d, faiss.METRIC_INNER_PRODUCT
        ):
            raise IndexFormatError(f"{file}: the HNSW graph's vector storage does not match the index")
    elif isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)):
        quantizer = faiss.downcast_index(index.quantizer)
        lists = index.invlists
        code_size = 4 * index.d if isinstance(index, faiss.IndexIVFFlat) else index.pq.M
        if not isinstance(quantizer, faiss.IndexFlat) or (quantizer.ntotal, quantizer.d) != (index.nlist, index.d) or (
            lists.nlist, lists.code_size) != (index.nlist, code_size):
            raise IndexFormatError(f"{file}: the IVF clusters or lists do not match the index")
        problem = centroid_problem(index)
        if problem is not None:
            raise IndexFormatError(f"{file}: {problem}")
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
    bad = non_unit_vector(index)
    if bad is not None and isinstance(index, faiss.IndexIVFPQ):
        raise IndexFormatError(
            f"{file}: the code of stored vector {bad[0]} reconstructs to norm {bad[1]:.4g}, outside "
            f"[{PQ_NORM_RANGE[0]}, {PQ_NORM_RANGE[1]}] (what codes of unit vectors reconstruct to; a longer one "
            "would win unrelated queries)"
        )
    if bad is not None:
        raise IndexFormatError(
            f"{file}: stored vector {bad[0]} has norm {bad[1]:.4g}, not 1 (vectors are unit vectors; a scaled, "
            "NaN or infinite one would distort every score)"
        )



def _read_demos(path: Path, manifest: Manifest, verify: bool) -> list[Demo]:
    file = path / manifest.files[DEMOS].name
    with _reading(file):
        data = _read_checked(file, manifest.files[DEMOS], verify)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{file}: not valid UTF-8") from exc
    line_ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1 if OFFSETS in manifest.files else None
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
    if OFFSETS in manifest.files:  # part of the version: checked, though an eager load needs no offsets
        offsets_file = path / manifest.files[OFFSETS].name
        with _reading(offsets_file):
            table = np.frombuffer(_read_checked(offsets_file, manifest.files[OFFSETS], verify), dtype=OFFSET_DTYPE)
        assert line_ends is not None
        if len(table) != len(line_ends) + 1 or table[0] != 0 or (table[1:] != line_ends).any():
            raise IndexFormatError(f"{offsets_file}: does not give where each line of {file.name} starts")
    return demos


def map_demos(path: Path, manifest: Manifest, verify: bool = True) -> MappedDemos:
    """The demos of the version ``manifest`` describes as a :class:`MappedDemos` over the mapped records and
    offset table (checked, not parsed).

    Raises:
        IndexFormatError: the index has no offset table, or the files disagree with the manifest.
    """
    if OFFSETS not in manifest.files:
        raise IndexFormatError(f"{path}: the index has no offset table (written by an older version); rebuild it")
    file, offsets_file = path / manifest.files[DEMOS].name, path / manifest.files[OFFSETS].name
    with _reading(file):
        data = _map_checked(file, manifest.files[DEMOS], verify)
    with _reading(offsets_file):
        offsets = _map_checked(offsets_file, manifest.files[OFFSETS], verify)
        if offsets is None or len(offsets) % OFFSET_DTYPE.itemsize:
            raise IndexFormatError(f"{offsets_file}: not a table of 8-byte offsets")
        return MappedDemos(file, offsets_file, manifest.count, data, offsets)


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
    """The bytes of ``file``, which must be a regular file of ``size`` (or at most ``limit``) bytes."""
    with _open_regular(file, size, limit=limit) as fh:
        return fh.read()


@contextmanager
def _open_regular(file: Path, size: int | None = None, *, limit: int | None = None) -> Iterator[Any]:
    """``file`` open for reading; it must be a regular file of ``size`` (or at most ``limit``) bytes.

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
        yield fh


def _read_checked(file: Path, expected: FileEntry, verify: bool) -> bytes:
    """Read a data file whole after checking its type and size (and then its hash) against the manifest."""
    data = _read_regular(file, expected.size)
    if verify:
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise IndexFormatError(f"{file}: sha256 differs from the manifest (file corrupted or modified)")
    return data


