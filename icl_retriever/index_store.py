"""The index on disk: one directory with a JSON manifest, a FAISS index and the demos as JSONL.

Save and load are mirror images over fixed file names. Nothing on the load path can execute code:
the manifest and records are JSON, the vectors are FAISS's own format (read only after its size and
sha256 match the manifest). A save goes to a temporary sibling directory that is renamed into
place, so a failed save leaves no partial index and never damages an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from icl_retriever._version import __version__
from icl_retriever.default_model import sha256_file
from icl_retriever.encoder import EncoderConfig
from icl_retriever.errors import IndexExistsError, IndexFormatError
from icl_retriever.records import Demo

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "index.faiss"
DEMOS_FILE = "demos.jsonl"


class FileEntry(BaseModel):
    """Size and hash of one data file, checked at load."""

    model_config = ConfigDict(extra="forbid")

    size: int
    sha256: str


class Manifest(BaseModel):
    """What an index is: format, encoder identity, shape, and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    created: datetime
    encoder: EncoderConfig
    fingerprint: str
    dim: int
    count: int
    index_type: Literal["flat"] = "flat"
    metric: Literal["inner_product"] = "inner_product"
    files: dict[str, FileEntry]


def new_flat_index(vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product index (cosine, since rows are normalised)."""
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def check_target(path: Path, *, force: bool) -> None:
    """Refuse to write over a file, a non-index directory, or an index without ``force``."""
    if path.is_file() or path.is_symlink() and not path.is_dir():
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
    """Write an index directory atomically and return its manifest.

    Raises:
        IndexExistsError: ``path`` holds something and ``force`` is not set (or it is not an index).
    """
    path = Path(path)
    check_target(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # vectors
        faiss.write_index(vectors_index, str(tmp / VECTORS_FILE))
        # demos, one JSON object per line, in index order
        with (tmp / DEMOS_FILE).open("w", encoding="utf-8") as fh:
            for demo in demos:
                fh.write(json.dumps(demo.record(), ensure_ascii=False) + "\n")
        # manifest last: it vouches for the files above
        manifest = Manifest(
            created=datetime.now(timezone.utc),
            encoder=encoder_config,
            fingerprint=fingerprint,
            dim=int(vectors_index.d),
            count=len(demos),
            files={name: _entry(tmp / name) for name in (VECTORS_FILE, DEMOS_FILE)},
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        _fsync_dir(tmp)
        _swap_into_place(tmp, path, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("format_version"), int) and raw["format_version"] > FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path}: index format version {raw['format_version']} is newer than this library supports "
            f"({FORMAT_VERSION}); upgrade icl-retriever"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise IndexFormatError(f"{manifest_path}: field '{field}': {first['msg']}") from exc


def load_index(path: str | Path, *, verify: bool = True) -> tuple[Manifest, faiss.Index, list[Demo]]:
    """Read an index directory, checking every file against the manifest before parsing it.

    Args:
        verify: check sha256 of the data files (sizes and shapes are always checked).

    Raises:
        IndexFormatError: a file is missing, truncated, corrupted or disagrees with the manifest.
    """
    path = Path(path)
    # manifest
    manifest = load_manifest(path)
    for name in (VECTORS_FILE, DEMOS_FILE):
        if name not in manifest.files:
            raise IndexFormatError(f"{path / MANIFEST_FILE}: lists no entry for {name}")
        _check_file(path / name, manifest.files[name], verify=verify)
    # vectors
    try:
        index = faiss.read_index(str(path / VECTORS_FILE))
    except RuntimeError as exc:
        raise IndexFormatError(f"{path / VECTORS_FILE}: not a readable FAISS index ({str(exc).splitlines()[0]})") from exc
    if index.d != manifest.dim or index.ntotal != manifest.count:
        raise IndexFormatError(
            f"{path / VECTORS_FILE}: holds {index.ntotal} vectors of dim {index.d}, "
            f"manifest says {manifest.count} of dim {manifest.dim}"
        )
    # demos, one JSON object per line, in index order
    demos = _read_demos(path / DEMOS_FILE)
    if len(demos) != manifest.count:
        raise IndexFormatError(f"{path / DEMOS_FILE}: holds {len(demos)} demos, manifest says {manifest.count}")
    return manifest, index, demos


def _read_demos(path: Path) -> list[Demo]:
    demos: list[Demo] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{path}: not valid UTF-8") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            demos.append(Demo.model_validate_json(line))
        except ValidationError as exc:
            raise IndexFormatError(f"{path}:{lineno}: invalid demo record ({exc.errors()[0]['msg']})") from exc
    return demos


def _entry(path: Path) -> FileEntry:
    return FileEntry(size=path.stat().st_size, sha256=sha256_file(path))


def _check_file(path: Path, expected: FileEntry, *, verify: bool) -> None:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing from the index directory")
    size = path.stat().st_size
    if size != expected.size:
        raise IndexFormatError(f"{path}: size {size} bytes, manifest says {expected.size} (truncated or replaced?)")
    if verify and sha256_file(path) != expected.sha256:
        raise IndexFormatError(f"{path}: sha256 differs from the manifest (file corrupted or modified)")


def _fsync_dir(directory: Path) -> None:
    for child in directory.iterdir():
        with child.open("rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, path: Path, *, force: bool) -> None:
    """Rename the finished directory into place, moving an existing index aside first."""
    if not path.exists():
        os.rename(tmp, path)
        return
    check_target(path, force=force)
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
