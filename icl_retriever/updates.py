"""Adding and removing demos: new snapshots made from an old one (the retriever swaps them in, in memory
or as a new on-disk version under the directory's write lock)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icl_retriever.errors import PoolError
from icl_retriever.records import Demo
from icl_retriever.search import Snapshot
from icl_retriever.store import all_vectors, new_flat_index, rebuild_index


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
