"""Embedding a pool: PIE vectors of the instructions and topic vectors of instruction + input, the one
path of :func:`~icl_retriever.build.build_index` and ``Retriever.from_demos``.

Embedding is the slow part of a large build, so it is checkpointed: the pool is embedded in chunks of
``chunk_size`` records and each finished chunk's vectors are saved (``.npz``, written to a temporary
name and renamed) in a resume directory beside the target, ``.{name}.build-{key}``, where the key is a
hash of a JSON serialisation of the encoder's fingerprint, the chunk size and the instructions. A build
that is interrupted and started again with the same pool and encoder re-embeds only the chunks that had
not finished.

A chunk is reused only if it proves what produced it: it carries a checksum of the encoder, its texts
and its vectors, which must match, its vectors must be unit vectors, and the directory must be this
user's and writable by no one else (a predictable name must not let someone else plant vectors). The
resume directory is deleted once the index is written, with any other checkpoint directory of the same
target left untouched for :data:`STALE_CHECKPOINT_S` (abandoned builds).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from icl_retriever.encoder import PIEEncoder
from icl_retriever.records import PIECE_CHARS, Demo
from icl_retriever.store import TopicInfo, new_flat_index, non_unit_row, replace_file
from icl_retriever.topic import TopicEncoder, TopicKind, topic_encoder_or_none, topic_info, topic_text

logger = logging.getLogger(__name__)

#: Instructions handed to the encoder at a time inside a chunk (in length order), so the progress
#: bar moves steadily; the encoder batches them by ``batch_size``.
_SLICE_BATCHES = 16
#: A checkpoint directory of the same target not modified for this long belongs to an abandoned build.
STALE_CHECKPOINT_S = 3600

Embed = Callable[..., np.ndarray]
#: What a pool's embedding gives: its PIE vectors, the flat index of its topic vectors, what the manifest
#: records of them, and their encoder (the last three None without topic vectors).
Embedded = tuple[np.ndarray, faiss.Index | None, TopicInfo | None, TopicEncoder | None]


def check_batch_size(batch_size: int | None) -> None:
    """Refuse a batch size before any model loads (``None``: the encoder's default).

    Raises:
        ValueError: not an integer >= 1.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def embed_demos(
    demos: Sequence[Demo], encoder: PIEEncoder, *, topic: TopicKind, embed: Embed
) -> Embedded:
    """The one embedding path of a pool, for :func:`build_index` and ``Retriever.from_demos``: PIE vectors
    of the instructions, then (``topic``) the flat index of topic vectors, what the manifest records of
    them, and their encoder. ``embed(texts, encoder, desc=...)`` embeds a text list (checkpointed in
    chunks for a build, at once in memory)."""
    # the topic encoder first: a kind that cannot be made fails before any embedding work
    topic_encoder, source = topic_encoder_or_none(encoder, topic)
    vectors = embed([d.instruction for d in demos], encoder)
    if topic_encoder is None or source is None:
        return vectors, None, None, None
    topic_vectors = embed([topic_text(d) for d in demos], topic_encoder, desc="Embedding topics")
    return vectors, new_flat_index(topic_vectors, topic_encoder.dim), topic_info(topic_encoder, source), topic_encoder


def embed_in_memory(
    demos: Sequence[Demo], encoder: PIEEncoder, *, topic: TopicKind, batch_size: int | None, show_progress_bar: bool
) -> Embedded:
    """:func:`embed_demos` without checkpoints (nothing is written), for an in-memory retriever."""

    def at_once(texts: list[str], enc: PIEEncoder, desc: str = "Embedding") -> np.ndarray:
        return embed_pool(texts, enc, batch_size=batch_size, chunk_size=max(1, len(texts)),
                          show_progress_bar=show_progress_bar, desc=desc)

    return embed_demos(demos, encoder, topic=topic, embed=at_once)


# resumable embedding -------------------------------------------------------------------------


def resume_dir(out: str | Path, instructions: Sequence[str], encoder: PIEEncoder | TopicEncoder, chunk_size: int) -> Path:
    """Where a build of ``instructions`` into ``out`` keeps its finished chunks (a key over the encoder, the
    chunk size and every text: :func:`_texts_digest`)."""
    digest = _texts_digest(json.dumps([encoder.fingerprint, chunk_size]), instructions)
    out = Path(out)
    return out.parent / f".{out.name}.build-{digest.hex()[:16]}"


def _texts_digest(head: str, texts: Sequence[str]) -> bytes:
    """sha256 over ``head`` and every text, each framed by its length in characters (unambiguous: no two lists
    of texts hash the same input), fed a megabyte of characters at a time, so a huge text is never copied whole."""
    digest = hashlib.sha256(head.encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))
        for start in range(0, len(text), PIECE_CHARS):
            digest.update(text[start : start + PIECE_CHARS].encode("utf-8"))
    return digest.digest()


def remove_abandoned_checkpoints(out: Path) -> None:
    """Checkpoint directories of earlier builds into ``out`` (other pools, failed builds) not touched for a while."""
    for directory in out.parent.glob(f".{glob.escape(out.name)}.build-*"):
        try:
            if time.time() - directory.lstat().st_mtime > STALE_CHECKPOINT_S:
                shutil.rmtree(directory)
        except OSError as exc:
            logger.warning("could not remove the abandoned checkpoint directory %s (%s)", directory, exc)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _is_private(directory: Path) -> bool:
    """A real directory of this user that no one else may write to: where chunks may be trusted from."""
    info = directory.lstat()
    owner = getattr(os, "getuid", lambda: info.st_uid)()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == owner and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def embed_pool(
    instructions: Sequence[str],
    encoder: PIEEncoder | TopicEncoder,
    *,
    resume_dir: Path | None = None,
    batch_size: int | None = None,
    chunk_size: int = 10_000,
    resume: bool = True,
    show_progress_bar: bool = False,
    desc: str = "Embedding",
) -> np.ndarray:
    """Embed instructions chunk by chunk, checkpointing each finished chunk in ``resume_dir``.

    Args:
        resume_dir: directory for the chunks (``chunk-000000.npy``, ...); ``None`` keeps nothing. One
            process at a time may use it (its leftovers are cleared here): :func:`~icl_retriever.build_index`
            holds the target's build lock (:func:`~icl_retriever.store.build_lock`) while it embeds.
        batch_size: prompts per forward pass (``None``: the encoder's ``default_batch_size``).
        resume: reuse valid chunks already in ``resume_dir``.

    Returns:
        float32 array ``(len(instructions), encoder.dim)``, rows in input order.
    """
    n, dim = len(instructions), encoder.dim
    vectors = np.empty((n, dim), dtype=np.float32)
    starts = range(0, n, chunk_size)
    if resume_dir is not None:
        if not resume or (os.path.lexists(resume_dir) and not _is_private(resume_dir)):
            _discard(resume_dir)
        resume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in resume_dir.glob("*.tmp-*"):  # writes of a killed build
            stale.unlink(missing_ok=True)
    done = 0
    todo: list[int] = []
    for number, start in enumerate(starts):
        stop = min(start + chunk_size, n)
        saved = None
        if resume_dir is not None:
            texts = instructions[start:stop]
            saved = _load_chunk(resume_dir / _chunk_name(number), _source(encoder, texts), len(texts), dim)
        if saved is None:
            todo.append(number)
        else:
            vectors[start:stop] = saved
            done += stop - start
    if done:
        logger.info("resuming: %d of %d instructions already embedded in %s", done, n, resume_dir)
    with tqdm(
        total=n, initial=done, desc=desc, unit=" demos", unit_scale=True, smoothing=0.1,
        disable=not show_progress_bar,
    ) as bar:
        for number in todo:
            start = number * chunk_size
            stop = min(start + chunk_size, n)
            chunk = _encode_chunk(encoder, instructions[start:stop], batch_size, bar)
            if resume_dir is not None:
                _save_chunk(resume_dir / _chunk_name(number), chunk, _source(encoder, instructions[start:stop]))
            vectors[start:stop] = chunk
    return vectors


def _encode_chunk(
    encoder: PIEEncoder | TopicEncoder, texts: Sequence[str], batch_size: int | None, bar: tqdm
) -> np.ndarray:
    """One chunk, longest first in slices of a few batches so the progress bar moves steadily."""
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    step = (batch_size or encoder.default_batch_size) * _SLICE_BATCHES
    for start in range(0, len(texts), step):
        idx = order[start : start + step]
        out[idx] = encoder.encode([texts[i] for i in idx], batch_size=batch_size, show_progress_bar=False)
        bar.update(len(idx))
    return out


def _chunk_name(number: int) -> str:
    return f"chunk-{number:06d}.npz"


def _source(encoder: PIEEncoder | TopicEncoder, texts: Sequence[str]) -> bytes:
    """What produces a chunk: a digest of the encoder (its fingerprint) and the chunk's texts."""
    return _texts_digest(json.dumps([encoder.fingerprint]), texts)


def _checksum(source: bytes, array: np.ndarray) -> str:
    """sha256 over what produced a chunk and the vectors it holds."""
    digest = hashlib.sha256(hashlib.sha256(source).digest())
    digest.update(np.ascontiguousarray(array, dtype=np.float32).data)
    return digest.hexdigest()


def _save_chunk(path: Path, array: np.ndarray, source: bytes) -> None:
    """Write a finished chunk atomically (the store's :func:`~icl_retriever.store.replace_file`)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, vectors=array, checksum=np.array(_checksum(source, array)))  # plain arrays: data only
        replace_file(path, [buffer.getbuffer()])
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file: name the chunk
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _load_chunk(path: Path, source: bytes, rows: int, dim: int) -> np.ndarray | None:
    """A finished chunk, or ``None`` unless it is exactly what this build would write from ``source``."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with np.load(path) as saved:  # allow_pickle=False: plain arrays only, loading runs no code
            array, checksum = saved["vectors"], str(saved["checksum"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
        return None
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != (rows, dim):
        return None
    if checksum != _checksum(source, array) or non_unit_row(array) is not None:
        return None
    return array
