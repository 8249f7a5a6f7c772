"""ONNX Runtime copies of encoders: the fast, torch-free way to embed on CPU.

A query through MiniLM-L6 is a few milliseconds of arithmetic, but through PyTorch it also pays
per-operator overhead, and a fresh process pays about 3 s to import torch and transformers. So the
first time a model is used with ``runtime="onnx"`` (or ``"auto"``), its transformer and pooling are
exported once to ONNX with torch, checked against torch on probe prompts (largest difference
:data:`~icl_retriever.encoder.onnx_export.TOLERANCE` or the export is refused; :mod:`.onnx_export`), and cached under the user cache directory, keyed by the
model files' identity (path, size, mtime) and the pooling. Later processes load the cached copy with
``onnxruntime`` and the model's ``tokenizer.json`` with ``tokenizers``: no torch, no transformers.

The numbers are float32 like torch's (measured differences about 1e-7), so an index built with
either runtime accepts queries from the other: the encoder's fingerprint names weights and settings,
and the runtime is a documented tolerance, not a different model. An ONNX file is a protobuf graph
of tensors, not code; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icl_retriever import default_model, presets
from icl_retriever.cache import cache_dir

logger = logging.getLogger(__name__)

#: Bump when the exported graph or the meta file changes shape, so old cache entries are not used.
FORMAT = 2
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
_CORES = os.cpu_count() or 1
#: Intra-op threads of a single batch (a query): a 30-token query splits well over a few cores only.
QUERY_THREADS = min(_CORES, 4)
#: Prompts per forward pass when the caller does not say: on 2 cores (two batches side by side, one thread
#: each) batches of 16 embed 5-10% faster than 32 (smaller activations stay in cache), 64 and 128 are slower
#: still (``benchmarks/onnx_settings.py``).
BATCH_SIZE = 16
_local = threading.local()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """On this thread, run even a single batch on one intra-op thread: for two models embedding a query
    side by side, each on its own core (several threads each would fight over the same cores)."""
    before = getattr(_local, "one_thread", False)
    _local.one_thread = True
    try:
        yield
    finally:
        _local.one_thread = before


class OnnxMeta(BaseModel):
    """What a cached export was made from and how it measured against torch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int
    model: str
    source: list[list[Any]]
    pooling: str
    normalize: bool
    int8: bool = False
    weights_sha256: str
    dim: int
    model_max_length: int
    pad_id: int
    onnx_size: int
    max_abs_diff: float
    min_cosine: float = 1.0
    fused: bool = Field(False, description="attention, layer norms and GELU fused by ONNX Runtime's optimizer")


def available() -> bool:
    """Whether ``onnxruntime`` and ``tokenizers`` import (the ONNX runtime's only needs at query time)."""
    try:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def source_files(model: str) -> list[Path] | None:
    """The files that decide ``model``'s weights and tokenizer, or None if they cannot be listed
    cheaply (a Hugging Face id resolved through the hub cache: that model runs on torch)."""
    preset = presets.find(model)
    if preset is not None:  # the base package's files, then the preset's delta and settings
        base = Path(str(importlib.resources.files(default_model.BASE_PACKAGE) / "model"))
        return sorted(p for p in base.iterdir() if p.is_file()) + preset.files()
    local = Path(model)
    if local.is_dir():
        return sorted(p for p in local.iterdir() if p.is_file())
    return None


def entry_dir(model: str, pooling: str, normalize: bool, *, int8: bool = False) -> Path | None:
    """The cache directory of ``model``'s export with this pooling (and int8 weights), or None if it
    cannot be cached."""
    try:
        files = source_files(model)
    except (OSError, ModuleNotFoundError):
        return None
    if not files:
        return None
    key = json.dumps([FORMAT, model, [_stat(p) for p in files], pooling, normalize] + (["int8"] if int8 else []))
    return cache_dir() / "onnx" / hashlib.sha256(key.encode()).hexdigest()[:32]


def find(model: str, pooling: str, normalize: bool, *, int8: bool = False) -> tuple[Path, OnnxMeta] | None:
    """The cached export of ``model`` if it is there, complete and made from the model's current files."""
    where = entry_dir(model, pooling, normalize, int8=int8)
    if where is None or not (where / META_FILE).is_file():
        return None
    try:
        meta = OnnxMeta.model_validate_json((where / META_FILE).read_text(encoding="utf-8"))
        files = source_files(model) or []
        if (
            meta.format != FORMAT
            or meta.int8 != int8
            or meta.source != [_stat(p) for p in files]
            or (where / ONNX_FILE).stat().st_size != meta.onnx_size
            or not (where / TOKENIZER_FILE).is_file()
        ):
            return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the damaged ONNX cache entry %s (%s)", where, exc)
        return None
    return where, meta


class OnnxRuntime:
    """ONNX Runtime sessions computing pooled, normalised embeddings from token ids.

    Two sessions of the same graph, each made on first use. Several batches (a build) run side by side
    on sessions computing on the calling thread only (one intra-op thread each: no splitting overhead,
    no idle pool threads). A single batch (a query) runs on a session that splits its matrices over up
    to :data:`QUERY_THREADS` cores, with pool threads that spin between operators but stop once the run
    is over, so the search that follows has the cores: measured in ``benchmarks/onnx_settings.py``.
    """

    def __init__(self, directory: Path, meta: OnnxMeta) -> None:
        self.meta = meta
        self._path = directory / ONNX_FILE
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._session(1)  # the graph is checked on load; a broken file fails here, not at the first query

    def _session(self, threads: int) -> Any:
        """The session computing on ``threads`` intra-op threads (made once)."""
        session = self._sessions.get(threads)
        if session is not None:
            return session
        import onnxruntime as ort

        with self._lock:
            if threads not in self._sessions:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                # A query's ~70 fused operators each wake the pool threads: spinning between them is about 20%
                # faster than sleeping (benchmarks/onnx_settings.py), and the spinning stops when the run ends,
                # so the search that follows has the cores.
                spin = threads > 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
                if spin:
                    options.add_session_config_entry("session.force_spinning_stop", "1")
                self._sessions[threads] = ort.InferenceSession(
                    str(self._path), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """Embeddings ``(n, dim)`` float32 of one padded batch, on ``threads`` intra-op threads."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        out = self._session(threads).run(None, feed)[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def run_many(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
        """Embeddings of several batches, in order: one batch on up to :data:`QUERY_THREADS` cores, more
        batches side by side, one thread per core (ONNX Runtime releases the GIL; a session may run
        concurrently)."""
        if len(batches) == 1:
            yield self.run(*batches[0], threads=1 if getattr(_local, "one_thread", False) else QUERY_THREADS)
            return
        workers = min(len(batches), _CORES)
        if workers <= 1:
            yield from (self.run(*b) for b in batches)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="icl-encode") as pool:
            yield from pool.map(lambda b: self.run(*b), batches)


class FastTokenizer:
    """The model's ``tokenizer.json`` through the ``tokenizers`` library: what the ONNX runtime needs
    of a tokenizer (ids with special tokens, padding, truncation; offsets), without transformers."""

    def __init__(self, path: Path, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_id = pad_id
        self._truncating: dict[int, Any] = {}

    def ids(self, texts: Sequence[str], *, special: bool = True, max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text (special tokens added when ``special``), cut to ``max_length`` the way
        the tokenizer's own truncation does (special tokens kept)."""
        tok = self.backend if max_length is None else self._truncated(max_length)
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=special)]

    def _truncated(self, max_length: int) -> Any:
        tok = self._truncating.get(max_length)
        if tok is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.backend.to_str())
            tok.enable_truncation(max_length)
            self._truncating[max_length] = tok
        return tok

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character span of every token (no special tokens, no truncation)."""
        return [e.offsets for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``input_ids`` and ``attention_mask`` (int64) of a batch."""
        return self.pad(self.ids(texts, max_length=max_length))

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``input_ids`` and ``attention_mask`` (int64) of token id rows."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> Any:
        """``tokenizers.Tokenizer.encode_batch`` (token counting for ``max_tokens``)."""
        return self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
