"""The retriever: a pool of demos, their PIE embeddings in FAISS, and task-matched look-up."""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from icl_retriever.controls import (
    DEFAULT_HYBRID_WEIGHT,
    DEFAULT_RERANK,
    DEFAULT_RERANK_MARGIN,
    DemoFormat,
    DemoPredicate,
    MetadataFilter,
    MetadataIndex,
    SearchControls,
    as_predicate,
    RerankSetting,
    dedup_keep,
    format_demo,
    is_query_itself,
    mmr_order,
    pack_by_tokens,
    resolve_tokenizer,
    rerank_order,
    topic_text,
)
from icl_retriever.encoder import PIEEncoder, Runtime
from icl_retriever.errors import EncoderMismatchError, PoolError
from icl_retriever.store import (
    Manifest,
    TopicInfo,
    all_vectors,
    load_version,
    new_flat_index,
    rebuild_index,
    save_index,
    search,
    trusted_model,
    write_lock,
    write_version,
)
from icl_retriever.records import Demo, check_text, load_pool

logger = logging.getLogger(__name__)

#: A metadata filter matching at most this many demos is searched exactly over just those demos.
_EXACT_FILTER_MAX = 4096


class _State:
    """One version of the retriever's data, swapped as a whole so a search never mixes two versions."""

    __slots__ = ("demos", "index", "meta", "topic")

    def __init__(self, index: faiss.Index, demos: list[Demo], topic: faiss.Index | None) -> None:
        if topic is not None and topic.ntotal != len(demos):
            raise ValueError(f"topic index holds {topic.ntotal} vectors but {len(demos)} demos were given")
        self.index = index
        self.demos = demos
        self.topic = topic
        self.meta = MetadataIndex(demos)  # postings for metadata filters, built lazily per field


class _LRU:
    """A small thread-safe LRU map (query text -> embedding); size 0 disables it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


_CORES = os.cpu_count() or 1
_BASE_ENCODERS: dict[str, PIEEncoder] = {}
_BASE_LOCK = threading.Lock()


def _shared_base_encoder(device: Any, runtime: Runtime = "torch") -> PIEEncoder:
    """The ``"default-base"`` encoder, loaded once per process, device and runtime."""
    key = f"{device}|{runtime}"
    with _BASE_LOCK:
        if key not in _BASE_ENCODERS:
            _BASE_ENCODERS[key] = PIEEncoder("default-base", device=device, runtime=runtime)
        return _BASE_ENCODERS[key]


def default_topic_encoder(encoder: PIEEncoder) -> tuple[PIEEncoder, Literal["base_model", "same_model_plain"]]:
    """The encoder of topic vectors for an index of ``encoder``, and which kind it is.

    For the default encoder it is the base model without PIE training and without template
    (``"default-base"``); for any other model, the same model without its template.
    """
    if encoder.config.model == "default":
        return _shared_base_encoder(encoder.device, encoder.runtime), "base_model"
    return encoder.with_template("plain"), "same_model_plain"


def _topic_info(topic_encoder: PIEEncoder, source: Literal["base_model", "same_model_plain"]) -> TopicInfo:
    return TopicInfo(encoder=topic_encoder.config, fingerprint=topic_encoder.fingerprint, source=source, dim=topic_encoder.dim)


def _rows_to_demos(state: _State, rows: Sequence[int], scores: Sequence[float]) -> list[Demo]:
    return [state.demos[int(r)].model_copy(update={"score": float(s)}) for r, s in zip(rows, scores, strict=True)]


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
        self._state = _State(index, list(demos), topic_index)
        self._topic = topic
        self._topic_encoder = topic_encoder
        self.path = path
        self.manifest = manifest
        self._cache = _LRU(cache_size)
        # FAISS indexes may be searched concurrently; one model (torch or ONNX) embeds one batch at a time
        # (a tokenizer may not serve two threads), but the task and the topic model may run side by side.
        self._encode_locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._side: ThreadPoolExecutor | None = None
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
        pool = load_pool(demos)
        encoder = encoder or PIEEncoder(runtime="auto")
        vectors = encoder.encode(
            [d.instruction for d in pool], batch_size=batch_size, show_progress_bar=show_progress_bar
        )
        topic_index = info = topic_encoder = None
        if topic:
            topic_encoder, source = default_topic_encoder(encoder)
            topic_vectors = topic_encoder.encode(
                [topic_text(d) for d in pool], batch_size=batch_size, show_progress_bar=show_progress_bar
            )
            topic_index, info = new_flat_index(topic_vectors, topic_encoder.dim), _topic_info(topic_encoder, source)
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
            if current is not None and current.fingerprint == info.fingerprint:
                return current
            cfg = info.encoder
            own = {self.encoder.config.model} | ({self.manifest.encoder.model} if self.manifest else set())
            if info.source == "base_model" and cfg.model == "default-base":
                enc = _shared_base_encoder(self.encoder.device, self.encoder.runtime)
            elif info.source == "same_model_plain" and cfg.model in own:
                enc = self.encoder.with_template(cfg.template, add_period=cfg.add_period)
            else:  # a model the manifest names: trusted only as the index's own would be
                name = cfg.model if self.path is None else trusted_model(self.path, cfg.model)
                enc = PIEEncoder.from_config(cfg.model_copy(update={"model": name}), runtime=self.encoder.runtime)
            if enc.fingerprint != info.fingerprint:
                raise EncoderMismatchError(
                    f"{self.path or 'index'}: topic vectors were made by encoder {info.fingerprint} ({cfg.model!r}), "
                    f"but the one that loads now is {enc.fingerprint}; rebuild the index"
                )
            self._topic_encoder = enc
            return enc

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
        with self._encode_lock(self.encoder):
            vectors = self.encoder.encode([d.instruction for d in new], batch_size=batch_size, show_progress_bar=False)

        def topic_vectors() -> np.ndarray:
            encoder = self.topic_encoder()
            with self._encode_lock(encoder):
                return encoder.encode([topic_text(d) for d in new], batch_size=batch_size, show_progress_bar=False)

        new_topic = topic_vectors() if self._state.topic is not None else None

        def change(state: _State) -> _State:
            nonlocal new_topic
            new_ids = {d.id for d in new}
            clashes = [d.id for d in state.demos if d.id in new_ids]
            if clashes and not upsert:
                raise PoolError(f"id(s) already in the index: {', '.join(map(repr, clashes[:5]))} (use upsert)")
            keep = [i for i, d in enumerate(state.demos) if d.id not in new_ids]
            index = rebuild_index(state.index, np.concatenate([all_vectors(state.index)[keep], vectors]))
            topic = None
            if state.topic is not None:
                if new_topic is None:  # the version on disk gained topic vectors since we loaded ours
                    new_topic = topic_vectors()
                topic = new_flat_index(np.concatenate([all_vectors(state.topic)[keep], new_topic]), state.topic.d)
            return _State(index, [state.demos[i] for i in keep] + new, topic)

        self._apply(change, persist)
        return [d.id for d in new]

    def remove(self, ids: Iterable[str], *, persist: bool | None = None) -> list[str]:
        """Remove demos by id; returns those that were present (unknown ids are ignored).

        Args:
            persist: as for :meth:`add`.
        """
        drop = set(ids)
        removed: list[str] = []

        def change(state: _State) -> _State:
            keep = [i for i, d in enumerate(state.demos) if d.id not in drop]
            removed[:] = [d.id for d in state.demos if d.id in drop]
            index = rebuild_index(state.index, all_vectors(state.index)[keep])
            topic = None if state.topic is None else new_flat_index(all_vectors(state.topic)[keep], state.topic.d)
            return _State(index, [state.demos[i] for i in keep], topic)

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
        self._state = _State(version.index, version.demos, version.topic)
        self._topic, self.manifest = version.manifest.topic, version.manifest
        return True

    def _apply(self, change: Callable[[_State], _State], persist: bool | None) -> None:
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

    def get_demos(
        self,
        query: str,
        k: int = 4,
        *,
        diversity: float = 0.0,
        fetch_k: int | None = None,
        filter: MetadataFilter | DemoPredicate | None = None,  # the name vector stores use
        dedup: bool | float | None = None,
        exclude_query: bool = False,
        rerank: RerankSetting = "auto",
        rerank_margin: float = DEFAULT_RERANK_MARGIN,
        rerank_weight: float = DEFAULT_HYBRID_WEIGHT,
        min_score: float | Literal["auto"] | None = None,
        max_tokens: int | None = None,
        tokenizer: Any = None,
        demo_format: DemoFormat | None = None,
    ) -> list[Demo]:
        """The ``k`` demos whose instructions show the query's task, best first, each with ``score``.

        ``score`` is always the PIE (task) cosine between the query and the demo's instruction.

        Args:
            query: the incoming instruction (its input may be included; the task is what counts).
            k: how many; more than the pool holds returns the whole pool.
            diversity: 0 (default) ranks by similarity alone; above 0, maximal marginal relevance over
                the ``fetch_k`` best candidates trades similarity for variety (1: variety only), as
                LangChain's MMR selector with ``lambda_mult = 1 - diversity``.
            fetch_k: candidates examined by ``diversity``, ``rerank``, ``dedup`` and ``max_tokens``
                (default ``max(20, 4 k)``); must be at least ``k``.
            filter: only demos whose metadata match, as ``{"task": "translation"}`` (equality) or
                ``{"lang": ["en", "de"]}`` (any of), several keys all matching; or a callable
                ``Demo -> bool``. Applied during the search: the index is searched deeper until ``k``
                matches are found or the pool is exhausted.
            dedup: drop a demo whose cosine to a better-ranked one exceeds the threshold (``True``:
                0.95). Compares topic vectors (instruction + input) when the index has them, else
                instruction embeddings.
            exclude_query: drop demos whose instruction (or instruction + input) is the query itself,
                whitespace aside (leave-one-out evaluation, self-retrieval).
            rerank: how the ``fetch_k`` best candidates by task similarity are ordered. ``"auto"``
                (default): the ranking that helped an LLM most in our downstream benchmark
                (``controls.DEFAULT_RERANK``) when the index has topic vectors and ``diversity`` is 0,
                else task order (logged once). ``None``: task (PIE) order only.
                ``"task_then_topic"``: among the candidates within ``rerank_margin`` of the best
                PIE score (the query's task), order by the plain-embedding similarity of the demo's
                instruction + input to the query (its content); the other candidates follow by PIE
                score. Needs topic vectors (built by default).
                ``"hybrid"``: order the candidates by ``rerank_weight`` x PIE cosine + (1 -
                ``rerank_weight``) x that plain-embedding cosine.
            rerank_margin: PIE cosine margin defining "same task" for ``rerank`` (default 0.1).
            rerank_weight: PIE weight of ``rerank="hybrid"`` (default 0.5).
            min_score: drop demos whose PIE cosine is below this, so fewer than ``k`` (or none) may
                come back when the pool holds no demo of the query's task. ``"auto"``: the model's
                calibrated floor, at which a kept demo shares the query's task with precision 0.9 on
                tasks it never trained on (:meth:`PIEEncoder.calibrated_floor`).
            max_tokens: pack the best demos whose formatted length fits this budget in total, skipping
                one that would overflow (a later, shorter one may still fit); never truncates a demo.
            tokenizer: counts tokens for ``max_tokens``: default the encoder's tokenizer; a Hugging
                Face tokenizer, a model name or directory (``AutoTokenizer``), an object with
                ``encode`` (tiktoken) or a callable ``str -> int``.
            demo_format: the text counted per demo: default instruction, input (if any) and output
                on separate lines; a ``str.format`` template over ``instruction``, ``input``,
                ``output``, ``id`` and metadata fields; or a callable ``Demo -> str``.

        Raises:
            ValueError: empty query, ``k < 1``, or an invalid control (named in the message);
                an explicit ``rerank`` method on an index without topic vectors.
        """
        return self.get_demos_batch(
            [query],
            k=k,
            diversity=diversity,
            fetch_k=fetch_k,
            filter=filter,
            dedup=dedup,
            exclude_query=exclude_query,
            rerank=rerank,
            rerank_margin=rerank_margin,
            rerank_weight=rerank_weight,
            min_score=min_score,
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            demo_format=demo_format,
        )[0]

    def get_demos_batch(
        self,
        queries: Sequence[str],
        k: int = 4,
        *,
        diversity: float = 0.0,
        fetch_k: int | None = None,
        filter: MetadataFilter | DemoPredicate | None = None,
        dedup: bool | float | None = None,
        exclude_query: bool = False,
        rerank: RerankSetting = "auto",
        rerank_margin: float = DEFAULT_RERANK_MARGIN,
        rerank_weight: float = DEFAULT_HYBRID_WEIGHT,
        min_score: float | Literal["auto"] | None = None,
        max_tokens: int | None = None,
        tokenizer: Any = None,
        demo_format: DemoFormat | None = None,
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
        ctl = SearchControls.parse(
            k=k,
            diversity=diversity,
            fetch_k=fetch_k,
            filter=filter,
            dedup=dedup,
            exclude_query=exclude_query,
            rerank=rerank,
            rerank_margin=rerank_margin,
            rerank_weight=rerank_weight,
            min_score=min_score,
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            demo_format=demo_format,
        )
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
        side = self._side_by_side() if ctl.rerank is not None else None
        topic_future = side.submit(self._embed, queries, topic=True) if side is not None else None
        vectors = self._embed(queries, topic=False)
        if topic_future is not None:
            topic_vectors = topic_future.result()
        else:
            topic_vectors = self._embed(queries, topic=True) if ctl.rerank is not None else None
        need = min(ctl.n_candidates, len(state.demos))
        if need == 0:
            return [[] for _ in queries]
        if ctl.filter is None and not ctl.exclude_query:
            scores, ids = search(state.index, vectors, need)  # one search for the whole batch
            candidates = [(row_i[row_i >= 0], row_s[row_i >= 0]) for row_s, row_i in zip(scores, ids, strict=True)]
        else:
            candidates = [self._filtered_candidates(state, q, v, need, ctl) for q, v in zip(queries, vectors, strict=True)]
        return [
            self._select(state, vectors[i], None if topic_vectors is None else topic_vectors[i], rows, scores, ctl, counter)
            for i, (rows, scores) in enumerate(candidates)
        ]

    # look-up internals --------------------------------------------------------------------------

    def _encode_lock(self, encoder: PIEEncoder) -> threading.Lock:
        """The lock of the model behind ``encoder`` (a plain-template copy shares its model's lock)."""
        key = id(encoder.runtime_model)
        with self._locks_lock:
            return self._encode_locks.setdefault(key, threading.Lock())

    def _side_by_side(self) -> ThreadPoolExecutor | None:
        """A worker that embeds the topic vector while this thread embeds the task vector, where that
        is faster: two different ONNX models (they release the GIL) and more than one core. Measured in
        ``benchmarks/speed.py``: the default ranking then costs about one query embedding, not two."""
        topic = self.topic_encoder()
        if (
            self.encoder.runtime != "onnx"
            or topic.runtime != "onnx"
            or topic.runtime_model is self.encoder.runtime_model
            or _CORES < 2
        ):
            return None
        with self._locks_lock:
            if self._side is None:
                self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icl-topic")
            return self._side

    def _embed(self, queries: list[str], *, topic: bool) -> np.ndarray:
        """Query embeddings (PIE, or topic), from the LRU cache where possible, the rest in one batch."""
        encoder = self.topic_encoder() if topic else self.encoder
        kind = ("topic", encoder.fingerprint) if topic else ("pie",)
        out = np.empty((len(queries), encoder.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            cached = self._cache.get((kind, q))
            if cached is None:
                missing.setdefault(q, []).append(i)
            else:
                out[i] = cached
        if missing:
            texts = list(missing)
            with self._encode_lock(encoder):
                fresh = encoder.encode(texts, show_progress_bar=False)
            for text, vector in zip(texts, fresh, strict=True):
                out[missing[text]] = vector
                stored = vector.copy()
                stored.flags.writeable = False
                self._cache.put((kind, text), stored)
        return out

    def _filtered_candidates(
        self, state: _State, query: str, vector: np.ndarray, need: int, ctl: SearchControls
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``need`` best demos passing ``filter`` / ``exclude_query``, filtered during the search."""
        n = len(state.demos)
        spec = ctl.filter
        excluded: Callable[[int], bool] = (
            (lambda row: is_query_itself(state.demos[row], query)) if ctl.exclude_query else (lambda row: False)
        )
        if spec is not None and not callable(spec):
            allowed = state.meta.rows(spec)
            if len(allowed) == 0:
                return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
            if len(allowed) <= _EXACT_FILTER_MAX:
                return self._exact(state, allowed, vector, need, excluded)
            mask = np.zeros(n, dtype=bool)
            mask[allowed] = True
            # start deep enough to expect `need` matches at the filter's match rate
            start = math.ceil(1.5 * need * n / len(allowed)) + need
            return self._overfetch(state, vector, need, lambda row: bool(mask[row]) and not excluded(row), start)
        predicate = as_predicate(spec)
        if predicate is None:
            return self._overfetch(state, vector, need, lambda row: not excluded(row), need + 4)
        demos = state.demos
        return self._overfetch(
            state, vector, need, lambda row: bool(predicate(demos[row])) and not excluded(row), max(4 * need, 32)
        )

    @staticmethod
    def _exact(
        state: _State, rows: np.ndarray, vector: np.ndarray, need: int, excluded: Callable[[int], bool]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the given rows only (their stored vectors read back from the index)."""
        scores = state.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64)) @ vector
        order = np.argsort(-scores, kind="stable")
        keep_rows: list[int] = []
        keep_scores: list[float] = []
        for j in order:
            row = int(rows[j])
            if excluded(row):
                continue
            keep_rows.append(row)
            keep_scores.append(float(scores[j]))
            if len(keep_rows) == need:
                break
        return np.asarray(keep_rows, dtype=np.int64), np.asarray(keep_scores, dtype=np.float32)

    def _overfetch(
        self, state: _State, vector: np.ndarray, need: int, accept: Callable[[int], bool], start: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``fetch`` deep, keep accepted rows; double ``fetch`` until ``need`` are found or the pool is exhausted."""
        n = state.index.ntotal
        fetch = min(max(start, need), n)
        seen: dict[int, bool] = {}  # a predicate runs once per demo, whatever the rounds
        while True:
            scores, ids = search(state.index, vector[None, :], fetch)
            rows: list[int] = []
            kept: list[float] = []
            for score, row in zip(scores[0], ids[0], strict=True):
                if row < 0:
                    continue
                ok = seen.get(int(row))
                if ok is None:
                    ok = seen[int(row)] = accept(int(row))
                if ok:
                    rows.append(int(row))
                    kept.append(float(score))
                    if len(rows) == need:
                        break
            if len(rows) >= need:
                break
            if fetch >= n:
                if int((ids[0] >= 0).sum()) < n:
                    # an approximate index did not return every demo even at full depth: go exact
                    passing = np.asarray([r for r in range(n) if seen.get(r, None) or (r not in seen and accept(r))])
                    if not len(passing):
                        break
                    return self._exact(state, passing, vector, need, lambda row: False)
                break  # the pool is exhausted
            fetch = min(fetch * 2, n)
        return np.asarray(rows, dtype=np.int64), np.asarray(kept, dtype=np.float32)

    def _select(
        self,
        state: _State,
        vector: np.ndarray,
        topic_vector: np.ndarray | None,
        rows: np.ndarray,
        scores: np.ndarray,
        ctl: SearchControls,
        counter: Callable[[list[str]], list[int]] | None,
    ) -> list[Demo]:
        """Order, de-duplicate and cut the candidates (best first by PIE score) of one query."""
        if ctl.min_score is not None:  # resolved to a cosine by get_demos_batch
            keep = scores >= float(ctl.min_score)
            rows, scores = rows[keep], scores[keep]
        if not len(rows):
            return []
        order = list(range(len(rows)))
        if ctl.rerank is not None and ctl.rerank != "auto":
            assert state.topic is not None and topic_vector is not None
            topic_scores = state.topic.reconstruct_batch(rows) @ topic_vector
            order = rerank_order(ctl.rerank, scores, topic_scores, weight=ctl.rerank_weight, margin=ctl.rerank_margin)
        elif ctl.diversity > 0:
            order = mmr_order(vector, state.index.reconstruct_batch(rows), ctl.diversity)
        if ctl.dedup is not None:
            space = state.topic if state.topic is not None else state.index
            ordered_rows = np.ascontiguousarray(rows[order], dtype=np.int64)
            order = [order[j] for j in dedup_keep(space.reconstruct_batch(ordered_rows), ctl.dedup)]
        if ctl.max_tokens is not None:
            assert counter is not None
            texts = [format_demo(state.demos[int(rows[j])], ctl.demo_format) for j in order]
            order = [order[j] for j in pack_by_tokens(counter(texts), ctl.max_tokens, ctl.k)]
        else:
            order = order[: ctl.k]
        return _rows_to_demos(state, [rows[j] for j in order], [scores[j] for j in order])

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Retriever(demos={len(self.demos)}, encoder={self.encoder!r}{where})"
