"""Adding and removing demos: new snapshots made from an old one, swapped in whole by :class:`LiveIndex`,
in memory or as a new on-disk version under the directory's write lock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import EncoderMismatchError, PoolError
from icl_retriever.records import Demo
from icl_retriever.search import Snapshot
from icl_retriever.store import (
    Manifest,
    TopicInfo,
    all_vectors,
    load_version,
    new_flat_index,
    rebuild_index,
    save_index,
    write_lock,
    write_version,
)


def with_added(
    state: Snapshot, new: Sequence[Demo], vectors: np.ndarray, topic_vectors: np.ndarray | None, *, upsert: bool
) -> Snapshot:
    """``state`` plus ``new`` demos (their vectors, and topic vectors when the index keeps them); with
    ``upsert`` a demo whose id exists replaces the old one, else an existing id is a ``PoolError``."""
    new_ids = {d.id for d in new}
    clashes = [d.id for d in state.demos if d.id in new_ids]
    if clashes and not upsert:
        raise PoolError(f"id(s) already in the index: {', '.join(map(repr, clashes[:5]))} (use upsert)")
    keep = [i for i, d in enumerate(state.demos) if d.id not in new_ids]
    index = rebuild_index(state.index, np.concatenate([all_vectors(state.index)[keep], vectors]))
    topic = None
    if state.topic is not None:
        if topic_vectors is None:
            raise ValueError("the index keeps topic vectors: give the new demos' topic vectors")
        topic = new_flat_index(np.concatenate([all_vectors(state.topic)[keep], topic_vectors]), state.topic.d)
    return Snapshot(index, [state.demos[i] for i in keep] + list(new), topic)


def without(state: Snapshot, drop: set[str]) -> Snapshot:
    """``state`` without the demos whose ids are in ``drop`` (unknown ids are ignored)."""
    keep = [i for i, d in enumerate(state.demos) if d.id not in drop]
    index = rebuild_index(state.index, all_vectors(state.index)[keep])
    topic = None if state.topic is None else new_flat_index(all_vectors(state.topic)[keep], state.topic.d)
    return Snapshot(index, [state.demos[i] for i in keep], topic)


class LiveIndex:
    """A retriever's current data (a :class:`Snapshot`) and the directory it lives in, if any.

    Every change builds a new snapshot and swaps it in whole, so a search that took the old one never
    sees half an update. On disk a change is a read-modify-write under the directory's file lock:
    another process may have written a newer version since ours was loaded, so that one is changed.
    """

    def __init__(
        self,
        state: Snapshot,
        encoder: PIEEncoder,
        *,
        path: Path | None = None,
        manifest: Manifest | None = None,
        topic: TopicInfo | None = None,
        mmap: bool = False,
    ) -> None:
        if (state.topic is None) != (topic is None):
            raise ValueError("topic_index and topic go together: give both or neither")
        self.state = state
        self.topic = topic
        self.path = path
        self.manifest = manifest
        self._encoder = encoder
        self._mmap = mmap  # newer versions are loaded memory-mapped too
        self._lock = threading.Lock()

    def save(self, path: str | Path, *, force: bool = False) -> Manifest:
        """Write the current snapshot as a new index directory (atomically; ``force`` to replace one)."""
        state = self.state
        self.manifest = save_index(
            path, state.index, state.demos, encoder_config=self._encoder.config,
            fingerprint=self._encoder.fingerprint, force=force, topic_index=state.topic,
            topic=self.topic if state.topic is not None else None,
        )
        self.path = Path(path)
        return self.manifest

    def reload(self) -> bool:
        """Pick up a newer version of the directory; returns whether anything changed."""
        if self.path is None:
            raise ValueError("this retriever has no index directory to reload from")
        with self._lock:
            return self._reload(self.path)

    def _reload(self, path: Path) -> bool:
        version = load_version(path, mmap=self._mmap)
        if version.manifest == self.manifest:
            return False
        if version.manifest.fingerprint != self._encoder.fingerprint:
            raise EncoderMismatchError(f"{path}: now holds an index of another encoder ({version.manifest.fingerprint})")
        self.state = Snapshot(version.index, version.demos, version.topic)
        self.topic, self.manifest = version.manifest.topic, version.manifest
        return True

    def apply(self, change: Callable[[Snapshot], Snapshot], persist: bool | None) -> None:
        """Swap in ``change(current snapshot)``; with ``persist`` (default: when there is a directory) as a
        new on-disk version, written atomically under the directory's lock."""
        if persist is None:
            persist = self.path is not None
        with self._lock:
            if not persist:
                self.state = change(self.state)
                return
            if self.path is None:
                raise ValueError("this retriever has no index directory; save() it first or pass persist=False")
            with write_lock(self.path):
                self._reload(self.path)
                state = change(self.state)
                self.manifest = write_version(
                    self.path, state.index, state.demos, encoder_config=self._encoder.config,
                    fingerprint=self._encoder.fingerprint, previous=self.manifest, topic_index=state.topic,
                    topic=self.topic if state.topic is not None else None,
                )
                self.state = state

    def add(
        self, new: Sequence[Demo], vectors: np.ndarray, topic_vectors: Callable[[], np.ndarray], *,
        upsert: bool, persist: bool | None,
    ) -> None:
        """Add ``new`` demos with their ``vectors``; ``topic_vectors()`` embeds their topics, called only
        when the index keeps topic vectors (perhaps only the newer version on disk does)."""
        new_topic = topic_vectors() if self.state.topic is not None else None

        def change(state: Snapshot) -> Snapshot:
            nonlocal new_topic
            if state.topic is not None and new_topic is None:  # the version on disk gained topic vectors
                new_topic = topic_vectors()
            return with_added(state, new, vectors, new_topic, upsert=upsert)

        self.apply(change, persist)

    def remove(self, drop: set[str], *, persist: bool | None) -> list[str]:
        """Remove the demos whose ids are in ``drop``; returns those that were present."""
        removed: list[str] = []

        def change(state: Snapshot) -> Snapshot:
            removed[:] = [d.id for d in state.demos if d.id in drop]
            return without(state, drop)

        self.apply(change, persist)
        return removed
