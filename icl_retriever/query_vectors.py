"""Query vectors of a retriever: a small LRU cache, one lock per model, and the task and topic models
embedding side by side."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from icl_retriever.encoder import PIEEncoder
from icl_retriever.encoder.onnx import one_thread

if TYPE_CHECKING:
    from icl_retriever.topic import TopicEncoder

_CORES = os.cpu_count() or 1
#: Fewest length-sorted chunks a batch of queries is cut into: a few queries that arrived together (a
#: server's micro-batch) vary widely in length, and one forward pass would pad them all to the longest
#: (on eft_test queries, 16 in one pass cost ~1.7x their time one by one; in chunks of 4, about the same).
_QUERY_CHUNKS = 4


def query_batch_size(n: int, largest: int = 16) -> int:
    """Queries per forward pass for ``n`` queries: at least :data:`_QUERY_CHUNKS` chunks, at most ``largest``
    queries each (many queries sort into chunks of like length, so full batches pad little)."""
    return max(1, min(largest, n // _QUERY_CHUNKS))


class LRU:
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


class QueryVectors:
    """Embeds queries for one retriever: cached by (kind, text), one batch at a time per model (a
    tokenizer may not serve two threads; FAISS searches need no lock), and the topic vector computed
    on a side worker while the caller computes the task vector, where that is faster."""

    def __init__(self, cache_size: int) -> None:
        self.cache = LRU(cache_size)
        self._locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.side: ThreadPoolExecutor | None = None

    def lock(self, encoder: PIEEncoder | TopicEncoder) -> threading.Lock:
        """The lock of the model behind ``encoder`` (a plain-template copy shares its model's lock)."""
        key = id(encoder.runtime_model)
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def embed(self, encoder: PIEEncoder | TopicEncoder, queries: list[str], kind: Any) -> np.ndarray:
        """Embeddings of ``queries`` by ``encoder``, from the cache where possible, the rest in one batch.

        A query is cut to one character past the encoder's :attr:`text_limit` first: the encoder reads no
        further, so the vector is the same, and the cache holds no more of a 5 MB query than that.
        """
        out = np.empty((len(queries), encoder.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        cut = encoder.text_limit + 1
        for i, q in enumerate(queries):
            q = q[:cut]
            cached = self.cache.get((kind, q))
            if cached is None:
                missing.setdefault(q, []).append(i)
            else:
                out[i] = cached
        if missing:
            texts = list(missing)
            with self.lock(encoder):
                size = query_batch_size(len(texts), getattr(encoder, "default_batch_size", 16))
                fresh = encoder.encode(texts, batch_size=size, show_progress_bar=False)
            for text, vector in zip(texts, fresh, strict=True):
                out[missing[text]] = vector
                stored = vector.copy()
                stored.flags.writeable = False
                self.cache.put((kind, text), stored)
        return out

    def embed_both(
        self, encoder: PIEEncoder, topic_encoder: TopicEncoder | None, queries: list[str]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Task vectors, and topic vectors when ``topic_encoder`` is given: side by side, one intra-op thread
        each, when they are two different ONNX models (they release the GIL) on more than one core; else
        one after the other (a single ONNX model then splits its run over the cores). Measured in
        ``benchmarks/speed.py``: the default ranking then costs about one query embedding, not two."""
        if topic_encoder is None:
            return self.embed(encoder, queries, "pie"), None
        topic_kind = ("topic", topic_encoder.fingerprint)
        if (
            encoder.runtime != "onnx"
            or topic_encoder.runtime != "onnx"
            or topic_encoder.runtime_model is encoder.runtime_model
            or _CORES < 2
        ):
            return self.embed(encoder, queries, "pie"), self.embed(topic_encoder, queries, topic_kind)
        with self._locks_lock:
            if self.side is None:
                self.side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icl-topic")

        def on_one_thread(enc: PIEEncoder | TopicEncoder, kind: Any) -> np.ndarray:
            with one_thread():  # each model on its own core
                return self.embed(enc, queries, kind)

        topic = self.side.submit(on_one_thread, topic_encoder, topic_kind)
        return on_one_thread(encoder, "pie"), topic.result()
