"""The retriever: a pool of demos, their PIE embeddings in FAISS, and task-matched look-up."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import faiss
import numpy as np

from icl_retriever.encoder import PIEEncoder, Runtime
from icl_retriever.errors import EncoderMismatchError
from icl_retriever.messages import ChatMessage, demo_messages
from icl_retriever.query_vectors import QueryVectors
from icl_retriever.records import Demo, check_text, load_pool
from icl_retriever.search import DEFAULT_RERANK, SearchControls, SearchKwargs, Snapshot, select_batch
from icl_retriever.search.budget import resolve_tokenizer
from icl_retriever.store import (
    Manifest,
    MappedDemos,
    TopicInfo,
    check_rebuildable,
    load_version,
    new_flat_index,
    trusted_model,
)
from icl_retriever.topic import TopicEncoder, TopicEncoderSlot, TopicKind, no_topic_message, topic_text
from icl_retriever.updates import LiveIndex

logger = logging.getLogger(__name__)

def check_queries(queries: Sequence[str]) -> None:
    """The rule every query meets before it is embedded: a non-empty ``str`` of valid text.

    Raises:
        TypeError: a query is not a string.
        ValueError: a query is empty or blank, or holds text that cannot be encoded (named by position).
    """
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise TypeError(f"query {i} is {type(q).__name__}, expected str")
        if not q.strip():
            raise ValueError(f"query {i} is empty")
        check_text(q, f"query {i} ({q[:40]!r})")


class Retriever:
    """Return, for a request, the k demonstrations that show the same kind of task.

    Build one with :func:`build_index` (on disk) or :meth:`from_demos` (in memory), and open it with
    :meth:`from_index`; the constructor is for code that already holds the parts. A ``Retriever`` may be
    queried from many threads at once, and :meth:`add` / :meth:`remove` / :meth:`reload` swap its data as
    a whole, so a search sees one version or the next, never a mix.

    Examples:
        >>> r = Retriever.from_index("indexes/default")
        >>> [d.metadata["task"] for d in r.get_demos("Translate 'good night' into German.", k=2)]
        ['translation_en_de', 'translation_en_de']

    Args:
        encoder: the PIE encoder of the index.
        index: FAISS index of the demos' instruction embeddings (row i is ``demos[i]``).
        demos: the demos.
        path: the index directory the data was loaded from, which :meth:`add` / :meth:`remove` write
            back to (``None``: in memory only).
        manifest: the manifest of the version at ``path``.
        topic_index: optional flat index of the demos' topic vectors (row i is ``demos[i]``), used by
            ``rerank="task_then_topic"`` and ``dedup``; ``topic`` says which encoder made them.
        topic: which encoder made the topic vectors (with ``topic_index``, or neither).
        topic_encoder: that encoder, if already loaded (else loaded on first use).
        cache_size: query embeddings kept in an LRU cache (per embedding kind); 0 disables it.
        mmap: ``index`` was loaded memory-mapped from ``path``; :meth:`reload` maps newer versions too.

    Raises:
        ValueError: the index and the demos differ in number, or ``cache_size`` is negative.
        EncoderMismatchError: the index's vectors are not of the encoder's dimension.
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
        topic_encoder: TopicEncoder | None = None,
        cache_size: int = 1024,
        mmap: bool = False,
    ) -> None:
        if index.ntotal != len(demos):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(demos)} demos were given")
        if index.d != encoder.dim:
            raise EncoderMismatchError(f"index vectors have dim {index.d}, the encoder gives {encoder.dim}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        self.encoder = encoder
        records = demos if isinstance(demos, MappedDemos) else list(demos)  # mapped records stay on disk
        self._live = LiveIndex(Snapshot(index, records, topic_index), encoder, path=path, manifest=manifest,
                               topic=topic, mmap=mmap)
        self._topic_encoder = TopicEncoderSlot(encoder, topic_encoder)
        self._queries = QueryVectors(cache_size)
        self._said_task_order = False  # rerank="auto" on an index without topic vectors: said once

    @property
    def snapshot(self) -> Snapshot:
        """The current data (index, demos, topic vectors), swapped whole by every change."""
        return self._live.state

    @property
    def index(self) -> faiss.Index:
        """The FAISS index over the demos' instruction embeddings (row i is ``demos[i]``)."""
        return self._live.state.index

    @property
    def demos(self) -> Sequence[Demo]:
        """The demos, in index order (a list; for an index opened with ``mmap``, a sequence that reads
        each record from disk when asked)."""
        return self._live.state.demos

    @property
    def topic_index(self) -> faiss.Index | None:
        """The flat index of topic vectors (content vectors of instruction + input), or None."""
        return self._live.state.topic

    @property
    def topic(self) -> TopicInfo | None:
        """Which encoder made the topic vectors (None without topic vectors)."""
        return self._live.topic

    @property
    def path(self) -> Path | None:
        """The index directory this retriever was opened from or saved to, if any."""
        return self._live.path

    @property
    def manifest(self) -> Manifest | None:
        """The manifest of the version on disk this retriever holds, if any."""
        return self._live.manifest

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
        mmap: bool = False,
    ) -> Retriever:
        """Open an index directory with the encoder it was built with.

        The manifest's model is loaded on its word only if it is a packaged preset (``"default"``, ``"ieb"``,
        ...) or a directory inside the index directory (:func:`~icl_retriever.store.trusted_model`); any other model
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
            mmap: search the vector files memory-mapped where they lie instead of reading them into
                memory, for indexes larger than RAM (an ``ivfpq`` index keeps ``pq_m`` bytes a demo), and
                read each demo record from disk when it is returned. The same checks run over the mapped
                files; records are checked as they are read.

        Raises:
            IndexFormatError: the directory is missing, incomplete, corrupted or hostile.
            EncoderMismatchError: the encoder differs from the one the index was built with.
            ModelLoadError: the index's model cannot be loaded, or is not trusted without ``model``.
            ValueError: both ``encoder`` and ``model`` are given.

        Returns:
            A retriever over the index's current version; :meth:`add` and :meth:`remove` write back to it.
        """
        if encoder is not None and model is not None:
            raise ValueError("give encoder or model, not both")
        path = Path(path)
        version = load_version(path, verify=verify, mmap=mmap)
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
            mmap=mmap,
        )

    @classmethod
    def from_demos(
        cls,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        encoder: PIEEncoder | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        topic: TopicKind = True,
        cache_size: int = 1024,
    ) -> Retriever:
        """Embed a pool (file or records) into an in-memory retriever; nothing is written.

        For a quick start or a test; :func:`build_index` keeps the result on disk, so it is embedded once.

        Args:
            demos: a pool file (JSONL, JSON list, IEB, Parquet) or an iterable of :class:`Demo` / dicts,
                validated as :func:`load_pool` does.
            encoder: the encoder to embed with (default: the embedded PIE model).
            batch_size: instructions per forward pass (default: the runtime's).
            show_progress_bar: ``None``: on when logging at INFO.
            cache_size: query embeddings kept in the LRU cache (0 disables it).
            topic: also compute each demo's topic vector (instruction + input) for
                ``rerank="task_then_topic"`` and content-based ``dedup``; the kinds are those of
                :func:`~icl_retriever.build.build_index` (default: the plain embedding of the default's
                base or of another model, a second forward pass; ``"static"``: nearly free).

        Returns:
            An in-memory retriever; :meth:`save` writes it to a directory.

        Raises:
            PoolError: the pool is empty or a record is malformed (file and line named).

        Examples:
            >>> r = Retriever.from_demos([
            ...     {"instruction": "Write a haiku about rain.", "output": "..."},
            ...     {"instruction": "Translate 'thank you' into French.", "output": "Merci."},
            ... ])
            >>> r.get_demos("Write a haiku about snow.", k=1)[0].instruction
            'Write a haiku about rain.'
        """
        from icl_retriever.embed import embed_in_memory

        pool = load_pool(demos)
        encoder = encoder or PIEEncoder(runtime="auto")
        progress = show_progress_bar if show_progress_bar is not None else logger.getEffectiveLevel() <= logging.INFO
        vectors, topic_index, info, topic_encoder = embed_in_memory(
            pool, encoder, topic=topic, batch_size=batch_size, show_progress_bar=progress
        )
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
        """Write this retriever's index to a directory, which it then writes its updates to.

        Args:
            path: the index directory to create.
            force: replace an index already there (atomically: the old one stays loadable until the switch).

        Returns:
            The manifest written.

        Raises:
            IndexExistsError: ``path`` exists and ``force`` is not set.
            IndexWriteError: the write failed (full disk, permissions); nothing is left half-written.
        """
        return self._live.save(path, force=force)

    # topic vectors ----------------------------------------------------------------------------

    def topic_encoder(self) -> TopicEncoder:
        """The encoder of the topic vectors (loaded on first use and checked against the manifest).

        Raises:
            ValueError: the index has no topic vectors.
            EncoderMismatchError: the topic encoder that loads is not the one that made them.
        """
        manifest = self.manifest
        return self._topic_encoder.get(self.topic, manifest.encoder.model if manifest else None, self.path)

    # updates ------------------------------------------------------------------------------

    def add(
        self,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        upsert: bool = False,
        batch_size: int | None = None,
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
            IndexWriteError: writing the new version failed; the index on disk and in memory is unchanged.
            ValueError: an ``ivfpq`` index, which cannot change in place (checked before any embedding).
        """
        check_rebuildable(self.index)
        new = load_pool(demos)

        def embed(encoder: PIEEncoder, texts: list[str]) -> np.ndarray:
            with self._queries.lock(encoder):  # the query path may be using this encoder's session
                return encoder.encode(texts, batch_size=batch_size, show_progress_bar=False)

        vectors = embed(self.encoder, [d.instruction for d in new])
        self._live.add(new, vectors, lambda: embed(self.topic_encoder(), [topic_text(d) for d in new]),
                       upsert=upsert, persist=persist)
        return [d.id for d in new]

    def remove(self, ids: Iterable[str], *, persist: bool | None = None) -> list[str]:
        """Remove demos by id (unknown ids are ignored).

        Args:
            ids: the ids of the demos to remove.
            persist: as for :meth:`add`.

        Returns:
            The ids that were present and are now removed.

        Raises:
            ValueError: an ``ivfpq`` index, which cannot change in place.
            IndexWriteError: writing the new version failed; the index on disk and in memory is unchanged.
        """
        check_rebuildable(self.index)
        return self._live.remove(set(ids), persist=persist)

    def reload(self) -> bool:
        """Pick up a version of the index directory written by another process (``add``, ``remove``,
        ``build --force``), verified like a first load. Searches in flight finish on the version they began with.

        Returns:
            Whether a newer version was loaded (``False``: already current).

        Raises:
            ValueError: this retriever has no index directory (made with :meth:`from_demos`, never saved).
            IndexFormatError: the version on disk fails its checks; the retriever keeps the one it has.
            EncoderMismatchError: the directory now holds an index of another encoder.
        """
        return self._live.reload()

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
        """:meth:`get_demos` for many queries: all embedded in one batch (cached ones skipped), with the same
        controls, over one version of the index.

        Args:
            queries: the incoming instructions (a sequence of strings, not one string).
            k: demos per query.
            **controls: the search controls of :meth:`get_demos`.

        Returns:
            One list of demos per query, in the order of ``queries``.

        Raises:
            TypeError: ``queries`` is a single string, or holds a non-string.
            ValueError: an empty query, or a bad control (as for :meth:`get_demos`).

        Examples:
            >>> batch = r.get_demos_batch(["Write a haiku about rain.", "Translate 'thank you' into French."], k=2)
            >>> [len(demos) for demos in batch]
            [2, 2]
        """
        queries = _checked_queries(queries, "get_demos_batch takes a sequence of queries; use get_demos for one")
        ctl = SearchControls.parse(k=k, **controls)
        return self._search([(queries, ctl)])[0]

    def get_demos_grouped(self, groups: Sequence[tuple[Sequence[str], SearchControls]]) -> list[list[list[Demo]]]:
        """Several groups of queries, each with its own ``k`` and controls, embedded in one encoder batch.

        This is how a server answers requests that arrived together (each group is one request): the
        queries share the encoder pass, then each group is searched with its own controls over the same
        snapshot, so every answer equals :meth:`get_demos_batch` of that group.

        Args:
            groups: ``(queries, controls)`` pairs; build the controls with :meth:`SearchControls.parse`.

        Returns:
            For each group, for each of its queries, the demos.

        Raises:
            ValueError: an empty query, or a group's controls ask for a ranking this index cannot give.
        """
        groups = [
            (_checked_queries(queries, f"group {g}: expected a sequence of queries"), ctl)
            for g, (queries, ctl) in enumerate(groups)
        ]
        return self._search(groups)

    def get_messages(self, query: str, k: int = 4, **controls: Unpack[SearchKwargs]) -> list[ChatMessage]:
        """The demos of :meth:`get_demos` as alternating user / assistant chat messages (instruction and
        input as the user turn, output as the assistant turn, best demo first): the shape chat-completion
        APIs take, to put before the real request.

        Raises:
            ValueError: as :meth:`get_demos`.
        """
        return demo_messages(self.get_demos(query, k=k, **controls))

    def _search(self, groups: list[tuple[list[str], SearchControls]]) -> list[list[list[Demo]]]:
        """Checked groups: one snapshot and one embedding pass for all, then each group's selection."""
        state = self.snapshot  # one version for the whole batch
        has_topic = state.topic is not None
        resolved = [(queries, self._controls(ctl, has_topic=has_topic)) for queries, ctl in groups]
        flat = [q for queries, _ in resolved for q in queries]
        if not flat:
            return [[] for _ in resolved]
        # the topic model runs for every query when one group ranks by topic: one pass, and cached
        topic_encoder = self.topic_encoder() if any(ctl.rerank is not None for _, ctl in resolved) else None
        vectors, topic_vectors = self._queries.embed_both(self.encoder, topic_encoder, flat)
        out: list[list[list[Demo]]] = []
        start = 0
        for queries, ctl in resolved:
            rows = slice(start, start + len(queries))
            start += len(queries)
            if not queries:
                out.append([])
                continue
            counter = resolve_tokenizer(ctl.tokenizer, self.encoder.tokenizer) if ctl.max_tokens is not None else None
            topic = None if topic_vectors is None or ctl.rerank is None else topic_vectors[rows]
            out.append(select_batch(state, queries, vectors[rows], topic, ctl, counter))
        return out

    def _controls(self, ctl: SearchControls, *, has_topic: bool) -> SearchControls:
        """``ctl`` resolved for this index: ``rerank="auto"`` and ``min_score="auto"`` made concrete."""
        if ctl.rerank == "auto" and not has_topic and ctl.diversity == 0 and not self._said_task_order:
            self._said_task_order = True
            logger.warning(
                "%s has no topic vectors: demos are ranked by task similarity only, not by the default "
                "rerank=%r (rebuild with topic vectors for it; pass rerank=None to ask for task order)",
                self.path or "this index", DEFAULT_RERANK,
            )
        ctl = ctl.resolve(has_topic=has_topic)
        if ctl.min_score == "auto":
            ctl = ctl.model_copy(update={"min_score": self.encoder.calibrated_floor()})
        if ctl.rerank is not None and not has_topic:
            raise ValueError(no_topic_message(self.path))
        return ctl

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Retriever(demos={len(self.demos)}, encoder={self.encoder!r}{where})"


def _checked_queries(queries: Sequence[str], not_a_sequence: str) -> list[str]:
    """``queries`` as a list, each a non-empty string that UTF-8 can encode."""
    if isinstance(queries, str):
        raise TypeError(not_a_sequence)
    queries = list(queries)
    check_queries(queries)
    return queries
