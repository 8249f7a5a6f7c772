"""Building an index directory from a pool: validate everything first, embed in resumable chunks, index,
write atomically.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import ValidationError
from tqdm.auto import tqdm

from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import first_validation_error
from icl_retriever.store import (
    TopicInfo,
    AUTO_HNSW_FROM,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    TARGET_RECALL,
    IndexParams,
    IndexType,
    check_target,
    measure_recall,
    new_flat_index,
    new_index,
    non_unit_row,
    replace_file,
    save_index,
)
from icl_retriever.records import Demo, load_pool
from icl_retriever.retriever import Retriever
from icl_retriever.topic import default_topic_encoder, topic_info, topic_text

logger = logging.getLogger(__name__)

#: Instructions handed to the encoder at a time inside a chunk (in length order), so the progress
#: bar moves steadily; the encoder batches them by ``batch_size``.
_SLICE_BATCHES = 16
#: A checkpoint directory of the same target not modified for this long belongs to an abandoned build.
STALE_CHECKPOINT_S = 3600
#: Index parameter -> the build_index argument (and CLI flag) that sets it, for error messages.
_ARGUMENT_OF = {"M": "hnsw_m"}


def resolve_index_type(index_type: IndexType | Literal["auto"], count: int) -> IndexType:
    """``auto`` is exact search (flat) below :data:`AUTO_HNSW_FROM` demos and HNSW from there on."""
    if index_type == "auto":
        return "flat" if count < AUTO_HNSW_FROM else "hnsw"
    if index_type not in ("flat", "hnsw", "ivf"):
        raise ValueError(f"index_type must be 'auto', 'flat', 'hnsw' or 'ivf', got {index_type!r}")
    return index_type


def check_build_params(
    index_type: IndexType | Literal["auto"] = "auto",
    *,
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 32,
    chunk_size: int = 10_000,
) -> None:
    """Validate :func:`build_index`'s index parameters and sizes, before any pool is read or model loaded.

    Raises:
        ValueError: one line naming the argument (a parameter of another index type, or out of range).
    """
    for name, size in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
    if index_type != "auto":
        resolve_index_type(index_type, 0)  # validates the name
        explicit = {"hnsw": {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search},
                    "ivf": {"nlist": nlist, "nprobe": nprobe}}
        for other, values in explicit.items():
            given = [name for name, value in values.items() if value is not None]
            if other != index_type and given:
                raise ValueError(f"{', '.join(given)} apply to {other} indexes, not {index_type}")
    try:
        IndexParams(M=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe)
    except ValidationError as exc:
        field, _, msg = first_validation_error(exc, "index parameters")
        arg = _ARGUMENT_OF.get(field, field)
        raise ValueError(f"{arg} (--{arg.replace('_', '-')}): {msg}, got {exc.errors()[0]['input']!r}") from None


def build_index(
    pool: str | Path | Iterable[Demo | Mapping[str, Any]],
    out: str | Path,
    *,
    encoder: PIEEncoder | None = None,
    index_type: IndexType | Literal["auto"] = "auto",
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 32,
    chunk_size: int = 10_000,
    force: bool = False,
    resume: bool = True,
    topic: bool = True,
    show_progress_bar: bool | None = None,
) -> Retriever:
    """Validate a pool, embed its instructions and write an index directory.

    The pool is fully validated and the target checked before any embedding work, and the index
    is written atomically, so a failure leaves any existing index at ``out`` untouched.

    Args:
        pool: a pool file (JSONL, JSON list, IEB) or an iterable of :class:`Demo` / dicts.
        out: the index directory to create.
        encoder: defaults to the embedded PIE default.
        index_type: ``"flat"`` (exact), ``"hnsw"``, ``"ivf"``, or ``"auto"``: flat below 200,000 demos,
            HNSW from there on.
        hnsw_m, ef_construction, ef_search: HNSW parameters (defaults 32, 128, and ``ef_search``
            tuned: starting at 64 and doubled until recall@10 on a sample reaches 0.95).
        nlist, nprobe: IVF parameters (defaults: about sqrt(n) clusters; ``nprobe`` tuned from 32
            like ``ef_search``).
        batch_size: instructions per forward pass.
        chunk_size: instructions embedded (and checkpointed) at a time.
        force: replace an existing index at ``out``.
        resume: reuse the chunks an earlier, interrupted build of the same pool with the same
            encoder and chunk size finished; ``False`` embeds everything again.
        topic: also store topic vectors (plain embeddings of instruction + input, a flat index) for
            ``rerank="task_then_topic"`` and content-based ``dedup``; doubles the embedding work.
        show_progress_bar: ``None`` shows progress when logging is at INFO or lower.

    Returns:
        A :class:`Retriever` over the new index; ``retriever.manifest.recall_at_10`` holds the
        recall measured for an approximate index.

    Raises:
        PoolError: the pool is empty or malformed.
        IndexExistsError: ``out`` exists and ``force`` is not set.
        ValueError: a parameter of another index type, or a bad size.
    """
    out = Path(out)
    check_build_params(
        index_type, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
        batch_size=batch_size, chunk_size=chunk_size,
    )
    check_target(out, force=force)
    demos = load_pool(pool)
    encoder = encoder or PIEEncoder(runtime="auto")
    kind = resolve_index_type(index_type, len(demos))
    if show_progress_bar is None:
        show_progress_bar = logger.getEffectiveLevel() <= logging.INFO

    checkpoints: list[Path] = []  # deleted once the index is written

    def checkpointed(texts: list[str], enc: PIEEncoder, **kw: Any) -> np.ndarray:
        """Embed in resumable chunks checkpointed beside ``out`` (one checkpoint set per text list and encoder)."""
        checkpoints.append(resume_dir(out, texts, enc, chunk_size))
        return embed_pool(
            texts,
            enc,
            resume_dir=checkpoints[-1],
            batch_size=batch_size,
            chunk_size=chunk_size,
            resume=resume,
            show_progress_bar=show_progress_bar,
            **kw,
        )

    # topic vectors next, so that an interruption never costs a finished (HNSW) indexing step
    vectors, topic_index, info, topic_encoder = embed_demos(demos, encoder, topic=topic, embed=checkpointed)
    if kind == "hnsw":
        params = IndexParams(
            M=HNSW_M if hnsw_m is None else hnsw_m,
            ef_construction=HNSW_EF_CONSTRUCTION if ef_construction is None else ef_construction,
            ef_search=HNSW_EF_SEARCH if ef_search is None else ef_search,
        )
        tune = ef_search is None
    elif kind == "ivf":
        params, tune = IndexParams(nlist=nlist, nprobe=nprobe), nprobe is None
    else:
        params, tune = IndexParams(), False
    index = new_index(vectors, kind, params, dim=encoder.dim, progress=show_progress_bar)
    recall = measure_recall(index, vectors, tune_to=TARGET_RECALL if tune else None)
    if recall is not None:
        logger.info("%s index: recall@10 %.4f against exact search on a sample", kind, recall)
    del vectors  # the index holds its own copy
    manifest = save_index(
        out,
        index,
        demos,
        encoder_config=encoder.config,
        fingerprint=encoder.fingerprint,
        force=force,
        recall_at_10=recall,
        topic_index=topic_index,
        topic=info,
    )
    for directory in checkpoints:
        shutil.rmtree(directory, ignore_errors=True)
    _remove_abandoned_checkpoints(out)
    return Retriever(
        encoder, index, demos, path=out, manifest=manifest, topic_index=topic_index, topic=info,
        topic_encoder=topic_encoder,
    )


# embedding -------------------------------------------------------------------------------------


Embed = Callable[..., np.ndarray]


def embed_demos(
    demos: Sequence[Demo], encoder: PIEEncoder, *, topic: bool, embed: Embed
) -> tuple[np.ndarray, faiss.Index | None, TopicInfo | None, PIEEncoder | None]:
    """The one embedding path of a pool, for :func:`build_index` and ``Retriever.from_demos``: PIE vectors
    of the instructions, then (``topic``) the flat index of topic vectors, what the manifest records of
    them, and their encoder. ``embed(texts, encoder, desc=...)`` embeds a text list (checkpointed in
    chunks for a build, at once in memory)."""
    vectors = embed([d.instruction for d in demos], encoder)
    if not topic:
        return vectors, None, None, None
    topic_encoder, source = default_topic_encoder(encoder)
    topic_vectors = embed([topic_text(d) for d in demos], topic_encoder, desc="Embedding topics")
    return vectors, new_flat_index(topic_vectors, topic_encoder.dim), topic_info(topic_encoder, source), topic_encoder


# resumable embedding -------------------------------------------------------------------------


def resume_dir(out: str | Path, instructions: Sequence[str], encoder: PIEEncoder, chunk_size: int) -> Path:
    """Where a build of ``instructions`` into ``out`` keeps its finished chunks.

    The key hashes JSON (unambiguous: no two lists of texts serialise alike, whatever they contain).
    """
    payload = json.dumps([encoder.fingerprint, chunk_size, list(instructions)])
    out = Path(out)
    return out.parent / f".{out.name}.build-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _remove_abandoned_checkpoints(out: Path) -> None:
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
    encoder: PIEEncoder,
    *,
    resume_dir: Path | None = None,
    batch_size: int = 32,
    chunk_size: int = 10_000,
    resume: bool = True,
    show_progress_bar: bool = False,
    desc: str = "Embedding",
) -> np.ndarray:
    """Embed instructions chunk by chunk, checkpointing each finished chunk in ``resume_dir``.

    Args:
        resume_dir: directory for the chunks (``chunk-000000.npy``, ...); ``None`` keeps nothing.
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


def _encode_chunk(encoder: PIEEncoder, texts: Sequence[str], batch_size: int, bar: tqdm) -> np.ndarray:
    """One chunk, longest first in slices of a few batches so the progress bar moves steadily."""
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    step = batch_size * _SLICE_BATCHES
    for start in range(0, len(texts), step):
        idx = order[start : start + step]
        out[idx] = encoder.encode([texts[i] for i in idx], batch_size=batch_size, show_progress_bar=False)
        bar.update(len(idx))
    return out


def _chunk_name(number: int) -> str:
    return f"chunk-{number:06d}.npz"


def _source(encoder: PIEEncoder, texts: Sequence[str]) -> bytes:
    """What produces a chunk: the encoder (its fingerprint) and the chunk's texts, as JSON."""
    return json.dumps([encoder.fingerprint, list(texts)]).encode()


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
