"""The index on disk: one directory with a JSON manifest, a FAISS index and the demos as JSONL.

Save and load are mirror images over one directory. Nothing on the load path can execute code: the
manifest and records are JSON, and the vectors are FAISS's own format, opened only after the file's
size, sha256 and header agree with the manifest.

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
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError

from icl_retriever._version import __version__
from icl_retriever.default_model import sha256_file
from icl_retriever.encoder import EncoderConfig
from icl_retriever.errors import IndexExistsError, IndexFormatError
from icl_retriever.records import Demo

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS = "vectors"
DEMOS = "demos"
_SUFFIX = {VECTORS: ".faiss", DEMOS: ".jsonl"}
_DATA_PREFIX = {VECTORS: "index.", DEMOS: "demos."}
#: FAISS four-character codes we accept: flat inner-product (and, for later index types, HNSW flat).
_FAISS_FOURCC = {b"IxFI", b"IHNf"}
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")  # fourcc, d, ntotal, 2 dummies, is_trained, metric, float count
_LOAD_RETRIES = 5


class FileEntry(BaseModel):
    """One data file of the current version: its name, size and hash, checked at load."""

    model_config = ConfigDict(extra="forbid")

    name: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """What an index is: format, encoder identity, shape, version, and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    created: datetime
    updated: datetime
    generation: int = 1
    encoder: EncoderConfig
    fingerprint: str
    dim: int
    count: int
    index_type: Literal["flat"] = "flat"
    metric: Literal["inner_product"] = "inner_product"
    files: dict[Literal["vectors", "demos"], FileEntry]


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
) -> Manifest:
    """Write an index directory atomically (under the write lock) and return its manifest.

    Raises:
        IndexExistsError: ``path`` holds something and ``force`` is not set (or it is not an index).
    """
    path = Path(path)
    with write_lock(path):
        return write_version(
            path, vectors_index, demos, encoder_config=encoder_config, fingerprint=fingerprint, force=force
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
) -> Manifest:
    """Write one version of an index; the caller holds :func:`write_lock`.

    Args:
        force: replace an index that exists at ``path``.
        previous: the manifest this version updates (keeps its created time, bumps its generation).
    """
    check_target(path, force=force or previous is not None)
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
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        workdir.mkdir()
    try:
        # vectors
        vectors_path = workdir / f"{_DATA_PREFIX[VECTORS]}{token}{_SUFFIX[VECTORS]}"
        written.append(vectors_path)
        faiss.write_index(vectors_index, str(vectors_path))
        # demos, one JSON object per line, in index order
        demos_path = workdir / f"{_DATA_PREFIX[DEMOS]}{token}{_SUFFIX[DEMOS]}"
        written.append(demos_path)
        with demos_path.open("w", encoding="utf-8") as fh:
            for demo in demos:
                fh.write(json.dumps(demo.record(), ensure_ascii=False) + "\n")
        # manifest last: it vouches for the files above and switches to them in one rename
        manifest = Manifest(
            **base,
            updated=now,
            encoder=encoder_config,
            fingerprint=fingerprint,
            dim=int(vectors_index.d),
            count=len(demos),
            files={VECTORS: _entry(vectors_path), DEMOS: _entry(demos_path)},
        )
        for file in written:
            _fsync(file)
        staged = workdir / f".{MANIFEST_FILE}.{token}"
        written.append(staged)
        staged.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        _fsync(staged)
        os.replace(staged, workdir / MANIFEST_FILE)
        _fsync(workdir)
        if fresh:
            os.rename(workdir, path)
            _fsync(path.parent)
    except BaseException:
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for file in written:
                file.unlink(missing_ok=True)
        raise
    _remove_unreferenced(path, manifest)
    return manifest


def _remove_unreferenced(path: Path, manifest: Manifest) -> None:
    """Delete data files of older versions and leftovers of writers that were killed."""
    keep = {entry.name for entry in manifest.files.values()}
    for child in path.iterdir():
        stale_data = any(child.name.startswith(_DATA_PREFIX[r]) and child.name.endswith(_SUFFIX[r]) for r in _SUFFIX)
        stale_manifest = child.name.startswith(f".{MANIFEST_FILE}.")
        if (stale_data or stale_manifest) and child.name not in keep:
            child.unlink(missing_ok=True)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# reading ------------------------------------------------------------------------------------


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
    if not manifest_path.is_file():
        raise IndexFormatError(f"{manifest_path}: missing; {path} is not an icl-retriever index")
    try:
        raw = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{manifest_path}: not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{manifest_path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path}: index format version {version} is newer than this library supports "
            f"({FORMAT_VERSION}); upgrade icl-retriever"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise IndexFormatError(f"{manifest_path}: field '{field}': {first['msg']}") from exc
    for role in (VECTORS, DEMOS):
        if role not in manifest.files:
            raise IndexFormatError(f"{manifest_path}: field 'files.{role}': missing")
    for role, entry in manifest.files.items():
        if Path(entry.name).name != entry.name or not entry.name.endswith(_SUFFIX[role]):
            raise IndexFormatError(f"{manifest_path}: field 'files.{role}.name': {entry.name!r} is not a {role} file name")
    if manifest.count < 0 or manifest.dim < 1:
        raise IndexFormatError(f"{manifest_path}: count {manifest.count} / dim {manifest.dim} out of range")
    return manifest


def load_index(path: str | Path, *, verify: bool = True) -> tuple[Manifest, faiss.Index, list[Demo]]:
    """Read the current version of an index directory, checking each file before parsing it.

    A writer may switch versions while we read; then the files we were about to open are gone and
    we start again from the new manifest.

    Args:
        verify: check data files' sha256 (sizes, headers and shapes are always checked).

    Raises:
        IndexFormatError: a file is missing, truncated, corrupted or disagrees with the manifest.
    """
    path = Path(path)
    for attempt in range(_LOAD_RETRIES):
        manifest = load_manifest(path)
        try:
            return manifest, _read_vectors(path, manifest, verify), _read_demos(path, manifest, verify)
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


def _read_vectors(path: Path, manifest: Manifest, verify: bool) -> faiss.Index:
    file = path / manifest.files[VECTORS].name
    data = _read_checked(file, manifest.files[VECTORS], verify)
    if len(data) < _FLAT_HEADER.size or data[:4] not in _FAISS_FOURCC:
        raise IndexFormatError(f"{file}: not a FAISS index of a supported type (header {data[:4]!r})")
    if data[:4] == b"IxFI":
        _, d, ntotal, _, _, _, _, nfloats = _FLAT_HEADER.unpack_from(data)
        expected_size = _FLAT_HEADER.size + 4 * d * ntotal
        if (d, ntotal) != (manifest.dim, manifest.count) or nfloats != d * ntotal or len(data) != expected_size:
            raise IndexFormatError(
                f"{file}: holds {ntotal} vectors of dim {d} in {len(data)} bytes, "
                f"manifest says {manifest.count} of dim {manifest.dim}"
            )
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise IndexFormatError(f"{file}: not a readable FAISS index ({str(exc).splitlines()[0]})") from exc
    if index.d != manifest.dim or index.ntotal != manifest.count:
        raise IndexFormatError(
            f"{file}: holds {index.ntotal} vectors of dim {index.d}, manifest says {manifest.count} of dim {manifest.dim}"
        )
    return index


def _read_demos(path: Path, manifest: Manifest, verify: bool) -> list[Demo]:
    file = path / manifest.files[DEMOS].name
    data = _read_checked(file, manifest.files[DEMOS], verify)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{file}: not valid UTF-8") from exc
    demos: list[Demo] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue  # the newline that ends the file
        try:
            demos.append(Demo.model_validate_json(line))
        except ValidationError as exc:
            raise IndexFormatError(f"{file}:{lineno}: invalid demo record ({exc.errors()[0]['msg']})") from exc
    if len(demos) != manifest.count:
        raise IndexFormatError(f"{file}: holds {len(demos)} demos, manifest says {manifest.count}")
    return demos


def _read_checked(file: Path, expected: FileEntry, verify: bool) -> bytes:
    """Read a data file whole after checking its size (and hash) against the manifest."""
    try:
        with file.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != expected.size:
                raise IndexFormatError(
                    f"{file}: size {size} bytes, manifest says {expected.size} (truncated or replaced?)"
                )
            data = fh.read()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{file}: missing from the index directory") from exc
    if verify:
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise IndexFormatError(f"{file}: sha256 differs from the manifest (file corrupted or modified)")
    return data


def _entry(path: Path) -> FileEntry:
    return FileEntry(name=path.name, size=path.stat().st_size, sha256=sha256_file(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
