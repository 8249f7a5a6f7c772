"""The retriever: a pool of demos, their PIE embeddings in FAISS, and task-matched look-up."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import EncoderMismatchError, PoolError
from icl_retriever.index_store import (
    Manifest,
    all_vectors,
    load_index,
    new_flat_index,
    save_index,
    write_lock,
    write_version,
)
from icl_retriever.records import Demo, load_pool


class Retriever:
    """Return, for a request, the k demonstrations that show the same kind of task.

    >>> r = Retriever.from_index("indexes/default")
    >>> [d.metadata["task"] for d in r.get_demos("Translate 'good night' into German.", k=2)]
    ['translation_en_de', 'translation_en_de']

    Build one with :func:`build_index` (on disk) or :meth:`from_demos` (in memory).
    """

    def __init__(
        self,
        encoder: PIEEncoder,
        index: faiss.Index,
        demos: Sequence[Demo],
        *,
        path: Path | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        if index.ntotal != len(demos):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(demos)} demos were given")
        if index.d != encoder.dim:
            raise EncoderMismatchError(f"index vectors have dim {index.d}, the encoder gives {encoder.dim}")
        self.encoder = encoder
        # Index and demos are swapped together as one tuple, so a search never sees one without the other.
        self._state: tuple[faiss.Index, list[Demo]] = (index, list(demos))
        self.path = path
        self.manifest = manifest
        # FAISS indexes may be searched concurrently; the torch model may not run two forwards at once.
        self._encode_lock = threading.Lock()
        self._write_lock = threading.Lock()

    @property
    def index(self) -> faiss.Index:
        """The FAISS index over the demos' instruction embeddings (row i is ``demos[i]``)."""
        return self._state[0]

    @property
    def demos(self) -> list[Demo]:
        """The demos, in index order."""
        return self._state[1]

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_index(cls, path: str | Path, *, encoder: PIEEncoder | None = None, verify: bool = True) -> Retriever:
        """Open an index directory with the encoder it was built with.

        Args:
            path: the index directory.
            encoder: an already loaded encoder to reuse; it must have the index's fingerprint.
            verify: check data files' sha256 (sizes and shapes are always checked).

        Raises:
            IndexFormatError: the directory is missing, incomplete or corrupted.
            EncoderMismatchError: the encoder differs from the one the index was built with.
            ModelLoadError: the index's model cannot be loaded.
        """
        path = Path(path)
        manifest, index, demos = load_index(path, verify=verify)
        if encoder is None:
            cfg = manifest.encoder
            encoder = PIEEncoder(
                cfg.model, template=cfg.template, pooling=cfg.pooling, max_length=cfg.max_length, add_period=cfg.add_period
            )
        if encoder.fingerprint != manifest.fingerprint:
            raise EncoderMismatchError(
                f"{path}: built with encoder {manifest.fingerprint} ({manifest.encoder.model!r}), but the encoder "
                f"now loaded is {encoder.fingerprint} ({encoder.config.model!r}); rebuild the index with this encoder"
            )
        return cls(encoder, index, demos, path=path, manifest=manifest)

    @classmethod
    def from_demos(
        cls,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        encoder: PIEEncoder | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> Retriever:
        """Embed a pool (file or records) into an in-memory retriever; nothing is written."""
        pool = load_pool(demos)
        encoder = encoder or PIEEncoder()
        vectors = encoder.encode(
            [d.instruction for d in pool], batch_size=batch_size, show_progress_bar=show_progress_bar
        )
        return cls(encoder, new_flat_index(vectors), pool)

    def save(self, path: str | Path, *, force: bool = False) -> Manifest:
        """Write this retriever's index to a directory (atomically; ``force`` to replace one)."""
        self.manifest = save_index(
            path,
            self.index,
            self.demos,
            encoder_config=self.encoder.config,
            fingerprint=self.encoder.fingerprint,
            force=force,
        )
        self.path = Path(path)
        return self.manifest

    # updates ------------------------------------------------------------------------------

    def add(
        self,
        demos: str | Path | Iterable[Demo | Mapping[str, Any]],
        *,
        upsert: bool = False,
        batch_size: int = 32,
        persist: bool | None = None,
    ) -> list[str]:
        """Embed and add demos; only the new ones are embedded.

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
        with self._encode_lock:
            vectors = self.encoder.encode([d.instruction for d in new], batch_size=batch_size, show_progress_bar=False)

        def change(index: faiss.Index, current: list[Demo]) -> tuple[faiss.Index, list[Demo]]:
            new_ids = {d.id for d in new}
            clashes = [d.id for d in current if d.id in new_ids]
            if clashes and not upsert:
                raise PoolError(f"id(s) already in the index: {', '.join(map(repr, clashes[:5]))} (use upsert)")
            keep = [i for i, d in enumerate(current) if d.id not in new_ids]
            merged = np.concatenate([all_vectors(index)[keep], vectors])
            return new_flat_index(merged, index.d), [current[i] for i in keep] + new

        self._apply(change, persist)
        return [d.id for d in new]

    def remove(self, ids: Iterable[str], *, persist: bool | None = None) -> list[str]:
        """Remove demos by id; returns those that were present (unknown ids are ignored).

        Args:
            persist: as for :meth:`add`.
        """
        drop = set(ids)
        removed: list[str] = []

        def change(index: faiss.Index, current: list[Demo]) -> tuple[faiss.Index, list[Demo]]:
            keep = [i for i, d in enumerate(current) if d.id not in drop]
            removed[:] = [d.id for d in current if d.id in drop]
            return new_flat_index(all_vectors(index)[keep], index.d), [current[i] for i in keep]

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
        manifest, index, demos = load_index(self.path)
        if manifest == self.manifest:
            return False
        if manifest.fingerprint != self.encoder.fingerprint:
            raise EncoderMismatchError(f"{self.path}: now holds an index of another encoder ({manifest.fingerprint})")
        self._state, self.manifest = (index, demos), manifest
        return True

    def _apply(self, change: Callable[[faiss.Index, list[Demo]], tuple[faiss.Index, list[Demo]]], persist: bool | None) -> None:
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
                self._state = change(*self._state)
                return
            assert self.path is not None
            with write_lock(self.path):
                self._reload()
                index, demos = change(*self._state)
                self.manifest = write_version(
                    self.path,
                    index,
                    demos,
                    encoder_config=self.encoder.config,
                    fingerprint=self.encoder.fingerprint,
                    previous=self.manifest,
                )
                self._state = (index, demos)

    # look-up --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.demos)

    def get_demos(self, query: str, k: int = 4) -> list[Demo]:
        """The ``k`` demos whose instructions show the query's task, best first, each with ``score``.

        Args:
            query: the incoming instruction (its input may be included; the task is what counts).
            k: how many; more than the pool holds returns the whole pool.

        Raises:
            ValueError: empty query or ``k < 1``.
        """
        return self.get_demos_batch([query], k=k)[0]

    def get_demos_batch(self, queries: Sequence[str], k: int = 4) -> list[list[Demo]]:
        """:meth:`get_demos` for many queries, embedded in one batch."""
        if isinstance(queries, str):
            raise TypeError("get_demos_batch takes a sequence of queries; use get_demos for one")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise TypeError(f"query {i} is {type(q).__name__}, expected str")
            if not q.strip():
                raise ValueError(f"query {i} is empty")
        if not queries:
            return []
        with self._encode_lock:
            vectors = self.encoder.encode(list(queries), show_progress_bar=False)
        return self._search(vectors, k)

    def _search(self, vectors: np.ndarray, k: int) -> list[list[Demo]]:
        index, demos = self._state
        k = min(k, len(demos))
        if k == 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [
            [demos[j].model_copy(update={"score": float(s)}) for s, j in zip(row_s, row_i, strict=True) if j >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Retriever(demos={len(self.demos)}, encoder={self.encoder!r}{where})"
