"""Building an index directory from a pool: validate everything first, embed in resumable chunks
(:mod:`icl_retriever.embed`), index, write atomically."""


from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from icl_retriever.embed import check_batch_size, embed_demos, embed_pool, remove_abandoned_checkpoints, resume_dir
from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import first_validation_error
from icl_retriever.ray_engine import RayOptions
from icl_retriever.records import Demo, load_pool, load_pools
from icl_retriever.retriever import Retriever
from icl_retriever.topic import TopicEncoder, TopicKind, check_topic_kind
from icl_retriever.store import (
    AUTO_HNSW_FROM,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    PARAMS_OF,
    TARGET_RECALL,
    TopicInfo,
    IndexParams,
    IndexType,
    MappedDemos,
    build_lock,
    check_index_fits,
    check_target,
    map_demos,
    measure_recall,
    new_index,
    save_index,
)

logger = logging.getLogger(__name__)

#: IndexParams field -> the CLI flag that sets it, for error messages.
FLAG_OF = {"M": "--hnsw-m", "ef_construction": "--ef-construction", "ef_search": "--ef-search",
           "nlist": "--nlist", "nprobe": "--nprobe", "pq_m": "--pq-m"}


def resolve_index_type(index_type: IndexType | Literal["auto"], count: int) -> IndexType:
    """``auto`` is exact search (flat) below :data:`AUTO_HNSW_FROM` demos and HNSW from there on."""
    if index_type == "auto":
        return "flat" if count < AUTO_HNSW_FROM else "hnsw"
    if index_type not in PARAMS_OF:
        raise ValueError(f"index_type must be 'auto', 'flat', 'hnsw', 'ivf' or 'ivfpq', got {index_type!r}")
    return index_type


def index_params(**flags: int | None) -> IndexParams:
    """:class:`IndexParams` from CLI values (``M`` and the others by field name); an invalid one is a
    ``ValueError`` naming its flag."""
    try:
        return IndexParams(**flags)
    except ValidationError as exc:
        field, _, msg = first_validation_error(exc, "index parameters")
        raise ValueError(f"{FLAG_OF.get(field, field)}: {msg}, got {exc.errors()[0]['input']!r}") from None


def check_build_params(
    index_type: IndexType | Literal["auto"] = "auto",
    index: IndexParams | None = None,
    *,
    batch_size: int | None = None,
    chunk_size: int = 10_000,
    count: int | None = None,
) -> None:
    """Validate :func:`build_index`'s index type, parameters and sizes, before any pool is read or model loaded.

    A parameter the index will not use is an error, never ignored: with ``"auto"``, IVF and IVF-PQ
    parameters always are (auto builds flat or HNSW), and HNSW ones are once ``count`` (the pool's size)
    shows that auto builds a flat index.

    Args:
        count: the pool's size, when known (resolves ``"auto"``).

    Raises:
        ValueError: one line naming the argument (a parameter of another index type, or out of range).
    """
    check_batch_size(batch_size)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if index is not None and not isinstance(index, IndexParams):
        raise TypeError(f"index must be an IndexParams, got {type(index).__name__}")
    kind = resolve_index_type(index_type, count) if count is not None or index_type != "auto" else None
    given = [] if index is None else [name for name, value in index if value is not None]
    usable = PARAMS_OF[kind] if kind is not None else PARAMS_OF["flat"] + PARAMS_OF["hnsw"]
    wrong = [name for name in given if name not in usable]
    if not wrong:
        return
    owner = next(t for t, names in PARAMS_OF.items() if wrong[0] in names)
    if index_type != "auto":
        raise ValueError(f"{', '.join(wrong)} apply to {owner} indexes, not {index_type}")
    builds = (f"a {kind} index for {count} demos" if kind is not None
              else f"flat below {AUTO_HNSW_FROM:,} demos, hnsw from there")
    raise ValueError(f"{', '.join(wrong)} apply to {owner} indexes; index_type 'auto' builds {builds}: name the "
                     f"type (--index-type {owner}) to use {', '.join(FLAG_OF[n] for n in wrong)}")


def _complete(kind: IndexType, given: IndexParams) -> tuple[IndexParams, bool]:
    """``given`` with defaults for the rest, and whether to tune ``ef_search`` / ``nprobe`` (not given)."""
    if kind == "hnsw":
        return IndexParams(
            M=HNSW_M if given.M is None else given.M,
            ef_construction=HNSW_EF_CONSTRUCTION if given.ef_construction is None else given.ef_construction,
            ef_search=HNSW_EF_SEARCH if given.ef_search is None else given.ef_search,
        ), given.ef_search is None
    if kind == "ivf":
        return IndexParams(nlist=given.nlist, nprobe=given.nprobe), given.nprobe is None
    if kind == "ivfpq":
        return IndexParams(nlist=given.nlist, nprobe=given.nprobe, pq_m=given.pq_m), given.nprobe is None
    return IndexParams(), False


def build_index(
    pool: str | Path | Sequence[str | Path] | Iterable[Demo | Mapping[str, Any]],
    out: str | Path,
    *,
    encoder: PIEEncoder | None = None,
    engine: Literal["local", "ray"] = "local",
    ray: RayOptions | None = None,
    index_type: IndexType | Literal["auto"] = "auto",
    index: IndexParams | None = None,
    batch_size: int | None = None,
    chunk_size: int = 10_000,
    force: bool = False,
    resume: bool = True,
    topic: TopicKind = True,
    show_progress_bar: bool | None = None,
    wait: float | None = 0.0,
) -> Retriever:
    """Validate a pool, embed its instructions and write an index directory.

    The pool is fully validated and the target checked before any embedding work, and the index
    is written atomically, so a failure leaves any existing index at ``out`` untouched. A local build
    holds ``out``'s build lock (:func:`~icl_retriever.store.build_lock`) from the target check to the
    last write: two builds of one directory never share their checkpoints or staging. (A Ray build stages
    in a private directory; of two at once, the second to write meets the first's index.)

    Args:
        pool: a pool file (JSONL, JSON list, IEB), a list of them (or, with Ray, glob patterns), or an
            iterable of :class:`Demo` / dicts.
        engine: ``"local"`` embeds in this process, in resumable chunks; ``"ray"`` reads and embeds on a
            Ray cluster (:mod:`icl_retriever.ray_engine`, ``pip install "icl-retriever[ray]"``), then
            indexes and writes here; pool files only.
        ray: where and how wide the Ray build runs (default: a local cluster, two actors).
        out: the index directory to create.
        encoder: defaults to the embedded PIE default.
        index_type: ``"flat"`` (exact), ``"hnsw"``, ``"ivf"``, ``"ivfpq"`` (IVF over product-quantised
            codes: ``pq_m`` bytes a demo instead of 1.5 KiB, approximate scores), or ``"auto"``: flat below
            200,000 demos, HNSW from there on.
        index: the index type's parameters, any left out take their defaults: HNSW's ``M`` 32,
            ``ef_construction`` 128, ``ef_search`` tuned (from 64, doubled until recall@10 on a sample
            reaches 0.95); IVF's ``nlist`` about sqrt(n) clusters, ``nprobe`` tuned from 32 likewise;
            IVF-PQ's ``pq_m`` one byte per 4 dimensions (96 for 384).
        batch_size: instructions per forward pass (``None``: the encoder's default, 16 on ONNX Runtime).
        chunk_size: instructions embedded (and checkpointed) at a time.
        force: replace an existing index at ``out``.
        resume: reuse the chunks an earlier, interrupted build of the same pool with the same
            encoder and chunk size finished; ``False`` embeds everything again.
        topic: also store topic vectors (content vectors of instruction + input, a flat index) for
            ``rerank="task_then_topic"`` and content-based ``dedup``. ``True`` / ``"contextual"``: the
            plain embedding of the default's untrained base (of another model: that model without its
            template), a second forward pass; ``"static"``: IDF-weighted word-piece vectors, nearly free
            (the default model only; builds about twice as fast, the LLM slightly worse downstream);
            ``False``: none.
        show_progress_bar: ``None`` shows progress when logging is at INFO or lower.
        wait: seconds a local build waits while another process builds into ``out`` (``0``, the default:
            refuse at once; ``None``: as long as it takes). After the wait, ``out`` holds that build's index, so
            without ``force`` this build then stops with :class:`IndexExistsError`.

    Returns:
        A :class:`Retriever` over the new index; ``retriever.manifest.recall_at_10`` holds the
        recall measured for an approximate index.

    Raises:
        PoolError: the pool is empty or malformed.
        IndexExistsError: ``out`` exists and ``force`` is not set.
        IndexBusyError: another process is building into ``out`` (and ``wait`` ran out).
        ValueError: a parameter of another index type, a bad size, or a topic kind the model has not.
    """
    out = Path(out)
    check_build_params(index_type, index, batch_size=batch_size, chunk_size=chunk_size)
    check_target(out, force=force)
    check_topic_kind(topic, encoder.config.model if encoder is not None else "default")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if engine == "ray" and (batch_size is not None or not resume or wait != 0):
        raise ValueError('batch_size, resume and wait apply to a local build; engine="ray" batches on its actors '
                         "and keeps no checkpoints")
    files = _as_files(pool)
    if engine == "ray" and files is None:
        raise ValueError('engine="ray" reads pool files: give a path, glob pattern or list of them')
    # a local pool is read and checked whole before the lock is taken: a bad pool leaves nothing behind
    demos = None if engine == "ray" else load_pools(files) if files is not None else load_pool(pool)  # type: ignore[arg-type]
    if demos is not None:
        check_build_params(index_type, index, batch_size=batch_size, chunk_size=chunk_size, count=len(demos))
    # a local build's checkpoints are named by its pool, so they are one process's under the build lock; a Ray
    # build stages in a private directory and meets a concurrent one only at the write (the write lock)
    with build_lock(out, wait) if demos is not None else nullcontext():
        check_target(out, force=force)  # again: a build we waited for may have made it
        return _build(demos, files, out, encoder=encoder, ray=ray, index_type=index_type, index=index,
                      batch_size=batch_size, chunk_size=chunk_size, force=force, resume=resume, topic=topic,
                      show_progress_bar=show_progress_bar)


def _build(
    demos: list[Demo] | None,
    files: list[str | Path] | None,
    out: Path,
    *,
    encoder: PIEEncoder | None,
    ray: RayOptions | None,
    index_type: IndexType | Literal["auto"],
    index: IndexParams | None,
    batch_size: int | None,
    chunk_size: int,
    force: bool,
    resume: bool,
    topic: TopicKind,
    show_progress_bar: bool | None,
) -> Retriever:
    """:func:`build_index`'s work, under the build lock, once its arguments, target and (local) ``demos``
    are checked; ``demos`` is None for a Ray build, which reads ``files`` on the cluster."""
    if show_progress_bar is None:
        show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
    if demos is None:
        from icl_retriever import ray_engine

        assert files is not None
        encoder = encoder or PIEEncoder(runtime="auto")
        # records are staged beside the target, named like checkpoints (an abandoned one is removed later)
        with ray_engine.read_and_embed(files, encoder, topic=topic, options=ray or RayOptions(),
                                       staging=out.parent / f".{out.name}.build-ray-") as embedded:
            return _index_and_write(*embedded, encoder, out, index_type, index, force=force, checkpoints=[],
                                    progress=show_progress_bar)
    encoder = encoder or PIEEncoder(runtime="auto")
    check_index_fits(resolve_index_type(index_type, len(demos)), index, len(demos), encoder.dim)

    checkpoints: list[Path] = []  # deleted once the index is written

    def checkpointed(texts: list[str], enc: PIEEncoder | TopicEncoder, **kw: Any) -> np.ndarray:
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
    return _index_and_write(demos, vectors, topic_index, info, topic_encoder, encoder, out, index_type, index,
                            force=force, checkpoints=checkpoints, progress=show_progress_bar)


def _as_files(pool: object) -> list[str | Path] | None:
    """``pool`` as a list of pool files or glob patterns, or None when it is records."""
    if isinstance(pool, (str, Path)):
        return [pool]
    if isinstance(pool, Sequence) and pool and all(isinstance(p, (str, Path)) for p in pool):
        return list(pool)
    return None


def _index_and_write(
    demos: Sequence[Demo],
    vectors: np.ndarray,
    topic_index: Any,
    info: TopicInfo | None,
    topic_encoder: TopicEncoder | None,
    encoder: PIEEncoder,
    out: Path,
    index_type: IndexType | Literal["auto"],
    index: IndexParams | None,
    *,
    force: bool,
    checkpoints: list[Path],
    progress: bool,
) -> Retriever:
    """Index embedded demos, tune recall, write the directory atomically, then drop the checkpoints."""
    check_build_params(index_type, index, count=len(demos))  # a Ray build learns the count only now
    kind = resolve_index_type(index_type, len(demos))
    params, tune = _complete(kind, index or IndexParams())
    vector_index = new_index(vectors, kind, params, dim=encoder.dim, progress=progress)
    recall = measure_recall(vector_index, vectors, tune_to=TARGET_RECALL if tune else None)
    if recall is not None:
        logger.info("%s index: recall@10 %.4f against exact search on a sample", kind, recall)
    del vectors  # the index holds its own copy
    manifest = save_index(
        out,
        vector_index,
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
    remove_abandoned_checkpoints(out)
    if isinstance(demos, MappedDemos):  # staged records: the retriever reads the index's own from now on
        demos = map_demos(out, manifest, verify=False)
    return Retriever(
        encoder, vector_index, demos, path=out, manifest=manifest, topic_index=topic_index, topic=info,
        topic_encoder=topic_encoder,
    )




