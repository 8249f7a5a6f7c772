"""The one write path: index versions (under a file lock) and every file written whole or not at all.

Crash safety: ``manifest.json`` is the commit record. Data files carry a per-version token in their
names (``index.<token>.faiss``, ``demos.<token>.jsonl``, ``offsets.<token>.u64``); a write puts the new version's files beside
the old ones, then switches ``manifest.json`` with one atomic rename (:func:`replace_file`), then deletes
what the manifest no longer names. A process killed at any moment leaves the old or the new version,
both loadable. A new index is assembled in a temporary sibling directory and renamed into place. Writers
are serialised with a file lock (:func:`write_lock`); readers need none. A whole build (embedding included)
holds a second lock, :func:`build_lock`, so that two builds of one directory never share their staging
(checkpoints, temporary directory): the second waits or is refused, never half-runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import faiss
from filelock import FileLock, Timeout

from icl_retriever.encoder import EncoderConfig
from icl_retriever.errors import IndexBusyError, IndexExistsError, IndexWriteError
from icl_retriever.records import Demo
from icl_retriever.store.demo_file import offset_table, record_chunks
from icl_retriever.store.faiss_index import describe_index, non_unit_vector
from icl_retriever.store.manifest import (
    DEMOS,
    FILE_PREFIX,
    FILE_SUFFIX,
    MANIFEST_FILE,
    OFFSETS,
    TOPIC,
    VECTORS,
    FileEntry,
    Manifest,
    TopicInfo,
)
from icl_retriever.store.reader import try_manifest
from icl_retriever.store.recall import measure_recall

logger = logging.getLogger(__name__)



@contextmanager
def write_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    """Serialise writers of one index (the lock file sits beside the directory).

    Raises:
        IndexBusyError: another writer held it for ``timeout`` seconds.
    """
    with _held(_lock_file(path, "lock"), timeout, what="writing", path=path):
        yield


@contextmanager
def build_lock(path: Path, timeout: float | None = 0.0, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``path``'s build lock: one build (or repair) of a directory at a time, across processes.

    Re-entrant in the process that holds it, so a caller may take it before :func:`~icl_retriever.build_index`
    takes it again. The lock is the operating system's (``flock``): a process that dies lets go of it.

    Args:
        timeout: seconds to wait for another process's build (``0``: refuse at once; ``None``: as long as it takes).
        on_wait: called once, before waiting, when another process holds the lock (to tell the user why).

    Raises:
        IndexBusyError: another process held it for ``timeout`` seconds.
    """
    lock = _lock_file(path, "build.lock")
    if on_wait is not None and timeout != 0:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            on_wait()
        else:
            lock.release()  # free: taken again below (a race with another process just means waiting)
    with _held(lock, timeout, what="building an index", path=path):
        yield


def _lock_file(path: Path, suffix: str) -> FileLock:
    """The process-wide (re-entrant) lock object of ``.<name>.<suffix>`` beside ``path``."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f".{path.name}.{suffix}"), is_singleton=True)


@contextmanager
def _held(lock: FileLock, timeout: float | None, *, what: str, path: Path) -> Iterator[None]:
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout)
    except Timeout:
        waited = f" (waited {timeout:g} s)" if timeout else ""
        raise IndexBusyError(
            f"{path}: another process is {what} there{waited}; wait for it to finish, or use another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


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
    demos: Sequence[Demo],
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
    demos: Sequence[Demo],
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
        bad = non_unit_vector(index) if index is not None else None
        if bad is not None:  # the loader would refuse it: never write it
            raise ValueError(f"{role} vector {bad[0]} has norm {bad[1]:.4g}; stored vectors must be unit vectors")
    if recall_at_10 is None:
        recall_at_10 = measure_recall(vectors_index)
    now = datetime.now(timezone.utc)
    if previous is None and (path / MANIFEST_FILE).is_file():
        previous = try_manifest(path)  # a forced rebuild continues the generation count
    base = dict(created=now, generation=1) if previous is None else dict(
        created=previous.created, generation=previous.generation + 1
    )
    fresh = not path.exists()
    workdir = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}" if fresh else path
    token = uuid.uuid4().hex[:12]
    written: list[Path] = []
    committed = False

    def write(role: str, chunks: Iterable[bytes]) -> FileEntry:
        file = workdir / f"{FILE_PREFIX[role]}{token}{FILE_SUFFIX[role]}"
        written.append(file)
        return _write_file(file, chunks)

    try:
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            workdir.mkdir()
        # vectors, serialised by FAISS and written by us (so a full disk is an OSError naming the file)
        files = {VECTORS: write(VECTORS, [faiss.serialize_index(vectors_index).data])}
        # demos, one JSON object per line, in index order, and where each line starts
        sizes: list[int] = []

        def lines() -> Iterator[bytes]:
            for demo in demos:
                size = 0
                for piece in record_chunks(demo):
                    size += len(piece)
                    yield piece
                sizes.append(size)

        files[DEMOS] = write(DEMOS, lines())
        files[OFFSETS] = write(OFFSETS, [offset_table(sizes)])
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
        replace_file(workdir / MANIFEST_FILE, [(manifest.model_dump_json(indent=2) + "\n").encode()])
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


def replace_file(file: Path, chunks: Iterable[bytes]) -> None:
    """Write ``file`` whole or not at all: into a temporary sibling, flushed to disk, then renamed over ``file``.

    The temporary file (``.<name>.tmp-<random>``) is removed if anything fails before the rename.
    """
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_file(tmp, chunks)
        _fsync(tmp)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_unreferenced(path: Path, manifest: Manifest) -> None:
    """Delete data files of older versions and leftovers of writers that were killed.

    Best effort, after the commit: only files and links are removed (a directory or FIFO that happens to
    be named like a data file is not ours and is left alone), and a failure is a warning, not an error.
    """
    keep = {entry.name for entry in manifest.files.values()}
    try:
        for child in path.iterdir():
            stale_data = any(child.name.startswith(FILE_PREFIX[r]) and child.name.endswith(FILE_SUFFIX[r]) for r in FILE_SUFFIX)
            stale_manifest = child.name.startswith(f".{MANIFEST_FILE}.")
            if (stale_data or stale_manifest) and child.name not in keep:
                mode = child.lstat().st_mode
                if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    child.unlink(missing_ok=True)
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("%s: the new version is written, but an old file could not be removed (%s)", path, exc)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
