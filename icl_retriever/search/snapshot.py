"""One version of a retriever's data: demos, their FAISS index, topic vectors and metadata postings.

A retriever swaps its snapshot as a whole (on add / remove / reload), so a search that took one never
mixes two versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss

from icl_retriever.search.filters import MetadataIndex
from icl_retriever.records import Demo


class Snapshot:
    """Demos, their index (row i is ``demos[i]``), optional topic vectors, and metadata postings."""

    __slots__ = ("demos", "index", "meta", "topic")

    def __init__(self, index: faiss.Index, demos: Sequence[Demo], topic: faiss.Index | None) -> None:
        if topic is not None and topic.ntotal != len(demos):
            raise ValueError(f"topic index holds {topic.ntotal} vectors but {len(demos)} demos were given")
        self.index = index
        self.demos = demos
        self.topic = topic
        self.meta = MetadataIndex(demos)  # postings for metadata filters, built lazily per field

    def scored(self, rows: Sequence[int], scores: Sequence[float]) -> list[Demo]:
        """Copies of the demos at ``rows`` carrying their scores (the stored demos stay untouched)."""
        return [self.demos[int(r)].model_copy(update={"score": float(s)}) for r, s in zip(rows, scores, strict=True)]
