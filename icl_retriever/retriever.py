"""The retriever: a pool of demos, their PIE embeddings in FAISS, and task-matched look-up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import faiss
import numpy as np

from icl_retriever.encoder import PIEEncoder, Runtime
from icl_retriever.errors import EncoderMismatchError
from icl_retriever.store import (
    Manifest,
    TopicInfo,
    load_version,
    new_flat_index,
    save_index,
    search,
    trusted_model,
    write_lock,
    write_version,
)
from icl_retriever.query_vectors import QueryVectors
from icl_retriever.records import Demo, check_text, load_pool
from icl_retriever.search import DEFAULT_RERANK, SearchControls, SearchKwargs, Snapshot, find_candidates, select
from icl_retriever.search.budget import resolve_tokenizer
from icl_retriever.topic import load_topic_encoder, topic_text
from icl_retriever.updates import with_added, without

logger = logging.getLogger(__name__)

class Retriever:
    """Return, for a request, the k demonstrations that show the same kind of task.

    >>> r = Retriever.from_index("indexes/default")
    >>> [d.metadata["task"] for d in r.get_demos("Translate 'good night' into German.", k=2)]
    ['translation_en_de', 'translation_en_de']

    Build one with :func:`build_index` (on disk) or :meth:`from_demos` (in memory).

    Args:
        encoder: the PIE encoder of the index.
        index: FAISS index of the demos' instruction embeddings (row i is ``demos[i]``).
        demos: the demos.
        topic_index: optional flat index of the demos' topic vectors (row i is ``demos[i]``), used by
            ``rerank="task_then_topic"`` and ``dedup``; ``topic`` says which encoder made them.
        topic_encoder: that encoder, if already loaded (else loaded on first use).
        cache_size: query embeddings kept in an LRU cache (per embedding kind); 0 disables it.
    """

    def __init__(
        self,
        encoder: PIEEncoder,
        index: faiss.Index,
        demos: Sequence[Demo],
        *,
        path: Path | None = None,
        manifest: Manifest | None = None,
        topic_index: faiss.Index | None = None,
        topic: TopicInfo | None = None,
        topic_encoder: PIEEncoder | None = None,
        cache_size: int = 1024,
    ) -> None:
        if index.ntotal != len(demos):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(demos)} demos were given")
        if index.d != encoder.dim:
            raise EncoderMismatchError(f"index vectors have dim {index.d}, the encoder gives {encoder.dim}")
        if (topic_index is None) != (topic is None):
            raise ValueError("topic_index and topic go together: give both or neither")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        self.encoder = encoder
        self._state = Snapshot(index, list(demos), topic_index)
        self._topic = topic
        self._topic_encoder = topic_encoder
        self.path = path
        self.manifest = manifest
        self._queries = QueryVectors(cache_size)
        self._write_lock = threading.Lock()
        self._topic_lock = threading.Lock()
        self._said_task_order = False  # rerank="auto" on an index without topic vectors: said once

    @property
    def index(self) -> faiss.Index:
        """The FAISS index over the demos' instruction embeddings (row i is ``demos[i]``)."""
        return self._state.index

    @property
    def demos(self) -> list[Demo]:
        """The demos, in index order."""
        return self._state.demos

    @property
    def topic_index(self) -> faiss.Index | None:
        """The flat index of topic vectors (plain embeddings of instruction + input), or None."""
        return self._state.topic

    @property
    def topic(self) -> TopicInfo | None:
        """Which encoder made the topic vectors (None without topic vectors)."""
        return self._topic

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        *,
        encoder: PIEEncoder | None = None,
        model: str | Path | None = None,
        verify: bool = True,
        cache_size: int = 1024,
        runtime: Runtime = "auto",
    ) -> Retriever:
        """Open an index directory with the encoder it was built with.

        The manifest's model is loaded on its word only if it is the embedded default or a directory
        inside the index directory (:func:`~icl_retriever.store.trusted_model`); any other model
        (a local path, a Hugging Face id) must be named by the caller, with ``model`` or ``encoder``.

        Args:
            path: the index directory.
            encoder: an already loaded encoder to reuse; it must have the index's fingerprint.
            model: the model to load (a directory or Hugging Face id you trust) with the manifest's
                settings, instead of the one the manifest names; it must give the index's fingerprint.
            verify: check data files' sha256 (sizes, shapes and contents are always checked).
            cache_size: query embeddings kept in the LRU cache (0 disables it).
            runtime: where query vectors are computed (:class:`PIEEncoder`): ``"auto"`` uses the ONNX copy
                of the model on CPU (exported and cached on first use; a later process loads it without
                torch), ``"torch"`` PyTorch. Both give the index's fingerprint.

        Raises:
            IndexFormatError: the directory is missing, incomplete, corrupted or hostile.
            EncoderMismatchError: the encoder differs from the one the index was built with.
            ModelLoadError: the index's model cannot be loaded, or is not trusted without ``model``.
        """
        if encoder is not None and model is not None:
            raise ValueError("give encoder or model, not both")
        path = Path(path)
        version = load_version(path, verify=verify)
        manifest = version.manifest
        if encoder is None:
            name = str(model) if model is not None else trusted_model(path, manifest.encoder.model)
            encoder = PIEEncoder.from_config(manifest.encoder.model_copy(update={"model": name}), runtime=runtime)
        if encoder.fingerprint != manifest.fingerprint:
            raise EncoderMismatchError(
                f"{path}: built with encoder {manifest.fingerprint} ({manifest.encoder.model!r}), but the encoder "
                f"now loaded is {encoder.fingerprint} ({encoder.config.model!r}); rebuild the index with this encoder"
            )
        return cls(
            encoder,
            version.index,
            version.demos,
            path=path,
            manifest=manifest,
            topic_index=version.topic,
            topic=manifest.topic,
            cache_size=cache_size,
        )

    @classmethod
    def from_demos(
        cls,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        encoder: PIEEncoder | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        topic: bool = True,
        cache_size: int = 1024,
    ) -> Retriever:
        """Embed a pool (file or records) into an in-memory retriever; nothing is written.

        Args:
            topic: also embed each demo's instruction + input with the plain (topic) encoder, for
                ``rerank="task_then_topic"`` and content-based ``dedup``; doubles the embedding work.
        """
        from icl_retriever.build import embed_demos, embed_pool

        pool = load_pool(demos)
        encoder = encoder or PIEEncoder(runtime="auto")
        progress = show_progress_bar if show_progress_bar is not None else logger.getEffectiveLevel() <= logging.INFO

        def in_memory(texts: list[str], enc: PIEEncoder, desc: str = "Embedding") -> np.ndarray:
            return embed_pool(texts, enc, batch_size=batch_size, chunk_size=max(1, len(texts)),
                              show_progress_bar=progress, desc=desc)

        vectors, topic_index, info, topic_encoder = embed_demos(pool, encoder, topic=topic, embed=in_memory)
        return cls(
            encoder,
            new_flat_index(vectors, encoder.dim),
            pool,
            topic_index=topic_index,
            topic=info,
            topic_encoder=topic_encoder,
            cache_size=cache_size,
        )

    def save(self, path: str | Path, *, force: bool = False) -> Manifest:
        """Write this retriever's index to a directory (atomically; ``force`` to replace one)."""
        state = self._state
        self.manifest = save_index(
            path,
            state.index,
            state.demos,
            encoder_config=self.encoder.config,
            fingerprint=self.encoder.fingerprint,
            force=force,
            topic_index=state.topic,
            topic=self._topic if state.topic is not None else None,
        )
        self.path = Path(path)
        return self.manifest

    # topic vectors ----------------------------------------------------------------------------

    def topic_encoder(self) -> PIEEncoder:
        """The encoder of the topic vectors (loaded on first use and checked against the manifest).

        Raises:
            ValueError: the index has no topic vectors.
            EncoderMismatchError: the topic encoder that loads is not the one that made them.
        """
        info = self._topic
        if info is None:
            raise ValueError(self._no_topic_message())
        with self._topic_lock:
            current = self._topic_encoder
            if current is None or current.fingerprint != info.fingerprint:
                own = {self.encoder.config.model} | ({self.manifest.encoder.model} if self.manifest else set())
                current = self._topic_encoder = load_topic_encoder(info, self.encoder, own, self.path)
            return current

    def _no_topic_message(self) -> str:
        where = f"{self.path}" if self.path else "this retriever"
        return (
            f"{where} has no topic vectors, which rerank='task_then_topic' needs (it was built with topic=False / "
            f"--no-topic, or by an older version); rebuild it with topic vectors: "
            f"icl-retriever build POOL --out {self.path or 'DIR'} --force (or build_index / Retriever.from_demos "
            f"with topic=True)"
        )

    # updates ------------------------------------------------------------------------------

    def add(
        self,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        upsert: bool = False,
        batch_size: int = 32,
        persist: bool | None = None,
    ) -> list[str]:
        """Embed and add demos; only the new ones are embedded (topic vectors too, when the index has them).

        Args:
            demos: a pool file or records, validated like a pool.
            upsert: replace demos whose id already exists instead of failing.
            persist: write the change to the index directory (atomically, under its write lock);
                ``None`` means yes when this retriever was opened from or saved to a directory.

        Returns:
            The ids added (or replaced).

        Raises:
            PoolError: a record is malformed, or an id exists and ``upsert`` is not set.
        """
        new = load_pool(demos)
        with self._queries.lock(self.encoder):
            vectors = self.encoder.encode([d.instruction for d in new], batch_size=batch_size, show_progress_bar=False)

        def topic_vectors() -> np.ndarray:
            encoder = self.topic_encoder()
            with self._queries.lock(encoder):
                return encoder.encode([topic_text(d) for d in new], batch_size=batch_size, show_progress_bar=False)

        new_topic = topic_vectors() if self._state.topic is not None else None

        def change(state: Snapshot) -> Snapshot:
            nonlocal new_topic
            if state.topic is not None and new_topic is None:  # the version on disk gained topic vectors
                new_topic = topic_vectors()
            return with_added(state, new, vectors, new_topic, upsert=upsert)

        self._apply(change, persist)
        return [d.id for d in new]

    def remove(self, ids: Iterable[str], *, persist: bool | None = None) -> list[str]:
        """Remove demos by id; returns those that were present (unknown ids are ignored).

        Args:
            persist: as for :meth:`add`.
        """
        drop = set(ids)
        removed: list[str] = []

        def change(state: Snapshot) -> Snapshot:
            removed[:] = [d.id for d in state.demos if d.id in drop]
            return without(state, drop)

        self._apply(change, persist)
        return removed

    def reload(self) -> bool:
        """Pick up a newer version of the index directory; returns whether anything changed."""
        if self.path is None:
            raise ValueError("this retriever has no index directory to reload from")
        with self._write_lock:
            return self._reload()

    def _reload(self) -> bool:
        assert self.path is not None
        version = load_version(self.path)
        if version.manifest == self.manifest:
            return False
        if version.manifest.fingerprint != self.encoder.fingerprint:
            raise EncoderMismatchError(f"{self.path}: now holds an index of another encoder ({version.manifest.fingerprint})")
        self._state = Snapshot(version.index, version.demos, version.topic)
        self._topic, self.manifest = version.manifest.topic, version.manifest
        return True

    def _apply(self, change: Callable[[Snapshot], Snapshot], persist: bool | None) -> None:
        """Run ``change`` on the current state, in memory or as a new on-disk version.

        On disk this is a read-modify-write under the directory's file lock: another process may have
        written a newer version since we loaded ours, so we reload first and change that.
        """
        if persist is None:
            persist = self.path is not None
        if persist and self.path is None:
            raise ValueError("this retriever has no index directory; save() it first or pass persist=False")
        with self._write_lock:
            if not persist:
                self._state = change(self._state)
                return
            assert self.path is not None
            with write_lock(self.path):
                self._reload()
                state = change(self._state)
                self.manifest = write_version(
                    self.path,
                    state.index,
                    state.demos,
                    encoder_config=self.encoder.config,
                    fingerprint=self.encoder.fingerprint,
                    previous=self.manifest,
                    topic_index=state.topic,
                    topic=self._topic if state.topic is not None else None,
                )
                self._state = state

    # look-up --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.demos)

    def get_demos(self, query: str, k: int = 4, **controls: Unpack[SearchKwargs]) -> list[Demo]:
        """The ``k`` demos whose instructions show the query's task, best first, each with ``score``.

        ``score`` is always the PIE (task) cosine between the query and the demo's instruction.

        Args:
            query: the incoming instruction (its input may be included; the task is what counts).
            k: how many; more than the pool holds returns the whole pool.
            **controls: the search controls, each documented on :class:`~icl_retriever.search.SearchControls`:
                ``diversity``, ``fetch_k``, ``filter``, ``dedup``, ``exclude_query``, ``rerank``,
                ``rerank_margin``, ``rerank_weight``, ``min_score``, ``max_tokens``, ``tokenizer``,
                ``demo_format``.

        Raises:
            ValueError: empty query, ``k < 1``, an unknown or invalid control (named in the message);
                an explicit ``rerank`` method on an index without topic vectors.
        """
        return self.get_demos_batch([query], k=k, **controls)[0]

    def get_demos_batch(
        self, queries: Sequence[str], k: int = 4, **controls: Unpack[SearchKwargs]
    ) -> list[list[Demo]]:
        """:meth:`get_demos` for many queries: all embedded in one batch (cached ones skipped), same controls."""
        if isinstance(queries, str):
            raise TypeError("get_demos_batch takes a sequence of queries; use get_demos for one")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise TypeError(f"query {i} is {type(q).__name__}, expected str")
            if not q.strip():
                raise ValueError(f"query {i} is empty")
            check_text(q, f"query {i} ({q[:40]!r})")
        ctl = SearchControls.parse(k=k, **controls)
        state = self._state  # one version for the whole batch
        if ctl.rerank == "auto" and state.topic is None and ctl.diversity == 0 and not self._said_task_order:
            self._said_task_order = True
            logger.warning(
                "%s has no topic vectors: demos are ranked by task similarity only, not by the default "
                "rerank=%r (rebuild with topic vectors for it; pass rerank=None to ask for task order)",
                self.path or "this index", DEFAULT_RERANK,
            )
        ctl = ctl.resolve(has_topic=state.topic is not None)
        if ctl.min_score == "auto":
            ctl = ctl.model_copy(update={"min_score": self.encoder.calibrated_floor()})
        if ctl.rerank is not None and state.topic is None:
            raise ValueError(self._no_topic_message())
        counter = resolve_tokenizer(ctl.tokenizer, self.encoder.tokenizer) if ctl.max_tokens is not None else None
        if not queries:
            return []
        topic_encoder = self.topic_encoder() if ctl.rerank is not None else None
        vectors, topic_vectors = self._queries.embed_both(self.encoder, topic_encoder, queries)
        need = min(ctl.n_candidates, len(state.demos))
        if need == 0:
            return [[] for _ in queries]
        if ctl.filter is None and not ctl.exclude_query:
            scores, ids = search(state.index, vectors, need)  # one search for the whole batch
            found = [(row_i[row_i >= 0], row_s[row_i >= 0]) for row_s, row_i in zip(scores, ids, strict=True)]
        else:
            found = [find_candidates(state, q, v, need, ctl) for q, v in zip(queries, vectors, strict=True)]
        return [
            select(state, vectors[i], None if topic_vectors is None else topic_vectors[i], rows, scores, ctl, counter)
            for i, (rows, scores) in enumerate(found)
        ]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Retriever(demos={len(self.demos)}, encoder={self.encoder!r}{where})"
