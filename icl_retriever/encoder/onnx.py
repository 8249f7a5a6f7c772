"""ONNX Runtime copies of encoders: the fast, torch-free way to embed on CPU.

A query through MiniLM-L6 is a few milliseconds of arithmetic, but through PyTorch it also pays
per-operator overhead, and a fresh process pays about 3 s to import torch and transformers. So the
first time a model is used with ``runtime="onnx"`` (or ``"auto"``), its transformer and pooling are
exported once to ONNX with torch, checked against torch on probe prompts (largest difference
:data:`TOLERANCE` or the export is refused), and cached under the user cache directory, keyed by the
model files' identity (path, size, mtime) and the pooling. Later processes load the cached copy with
``onnxruntime`` and the model's ``tokenizer.json`` with ``tokenizers``: no torch, no transformers.

The numbers are float32 like torch's (measured differences about 1e-7), so an index built with
either runtime accepts queries from the other: the encoder's fingerprint names weights and settings,
and the runtime is a documented tolerance, not a different model. An ONNX file is a protobuf graph
of tensors, not code; nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from icl_retriever import default_model
from icl_retriever.cache import cache_dir

if TYPE_CHECKING:
    from icl_retriever.encoder import PIEEncoder

logger = logging.getLogger(__name__)

#: Largest absolute difference, per vector component, allowed between the float ONNX copy and torch.
TOLERANCE = 1e-4
#: Smallest cosine allowed between an int8 ONNX copy's vectors and torch's float vectors on the probes.
INT8_MIN_COSINE = 0.98
#: Bump when the exported graph or the meta file changes shape, so old cache entries are not used.
FORMAT = 1
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
_CORES = os.cpu_count() or 1
_PROBES = [
    "Summarize the article below.",
    "Write a SQL query that lists customers from Spain.",
    "x",
    "Translate this text into German, keeping the names as they are: " + "word " * 400,
]


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
    if model in ("default", "default-base"):
        base = Path(str(importlib.resources.files(default_model.BASE_PACKAGE) / "model"))
        files = sorted(p for p in base.iterdir() if p.is_file())
        if model == "default":
            files += [p for p in (default_model.DELTA_FILE, default_model.CONFIG_FILE) if p.is_file()]
        return files
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
    """An ONNX Runtime session computing pooled, normalised embeddings from token ids.

    The session computes on the calling thread only (one intra-op thread): a single query gains little
    from splitting its small matrices across cores, and idle pool threads spinning after each run slow
    whatever the process does next. Cores are used by running batches side by side instead
    (:meth:`run_many`), and a retriever runs its task and topic models side by side.
    """

    def __init__(self, directory: Path, meta: OnnxMeta) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.meta = meta
        self.session = ort.InferenceSession(str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings ``(n, dim)`` float32 of one padded batch."""
        out = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def run_many(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
        """Embeddings of several batches, in order, computed on up to one thread per core (ONNX Runtime
        releases the GIL and a session may run concurrently)."""
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


def export(encoder: PIEEncoder, *, int8: bool = False) -> tuple[Path, OnnxMeta]:
    """Export a float torch encoder's model and pooling to the ONNX cache, checked against torch on probes;
    with ``int8``, then quantised by ONNX Runtime (dynamic, per-channel int8 weights of every MatMul).

    Raises:
        ValueError: the model cannot be exported (no ``tokenizer.json``, a decoder, not cacheable) or its
            ONNX copy differs from torch by more than :data:`TOLERANCE` (int8: a cosine below
            :data:`INT8_MIN_COSINE`).
    """
    import torch

    config = encoder.config
    if encoder.is_decoder:
        raise ValueError(f"{config.model!r}: decoder models run on torch only")
    tok = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if tok is None:
        raise ValueError(f"{config.model!r}: no fast tokenizer (tokenizer.json); it runs on torch only")
    where = entry_dir(config.model, config.pooling, config.normalize, int8=int8)
    if where is None:
        raise ValueError(f"{config.model!r}: not a local model or the default; it runs on torch only")
    files = source_files(config.model) or []
    source = [_stat(p) for p in files]

    class Pooled(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return encoder.pool(hidden, attention_mask)

    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=where.parent))
    try:
        sample = encoder.tokenizer(["a b c", "a"], padding=True, return_tensors="pt")
        args = (sample["input_ids"], sample["attention_mask"])
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}}
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow; _compare checks the result
            torch.onnx.export(
                Pooled(encoder.model).eval(), args, str(tmp / ONNX_FILE), input_names=["input_ids", "attention_mask"],
                output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False,
            )
        (tmp / TOKENIZER_FILE).write_text(tok.to_str(), encoding="utf-8")
        pad_id = encoder.tokenizer.pad_token_id
        meta = OnnxMeta(
            format=FORMAT, model=config.model, source=source, pooling=config.pooling, normalize=config.normalize,
            weights_sha256=encoder._weights_sha, dim=encoder.dim, model_max_length=encoder.model_max_length,
            pad_id=int(pad_id), onnx_size=(tmp / ONNX_FILE).stat().st_size, max_abs_diff=0.0,
        )
        diff, cosine = _compare(encoder, tmp, meta)
        if not diff <= TOLERANCE:
            raise ValueError(f"{config.model!r}: the ONNX copy differs from torch by {diff:.2e} > {TOLERANCE}")
        if int8:
            _quantize(tmp / ONNX_FILE)
            meta = meta.model_copy(update={"int8": True, "onnx_size": (tmp / ONNX_FILE).stat().st_size})
            diff, cosine = _compare(encoder, tmp, meta)
            if not cosine >= INT8_MIN_COSINE:
                raise ValueError(f"{config.model!r}: int8 vectors reach only cosine {cosine:.4f} to float ones")
        meta = meta.model_copy(update={"max_abs_diff": diff, "min_cosine": cosine})
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=2), encoding="utf-8")
        if where.exists():
            found = find(config.model, config.pooling, config.normalize, int8=int8)
            if found is not None:  # a concurrent export of the same model won; theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
                return found
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=where.parent))
            os.replace(where, stale / "entry")  # a damaged or outdated entry: moved aside, then deleted
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, where)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %r to ONNX%s at %s (max difference to torch %.1e, min cosine %.4f)",
                config.model, " int8" if int8 else "", where, diff, cosine)
    return where, meta


def _quantize(path: Path) -> None:
    """Replace the float ONNX file by ONNX Runtime's dynamic int8 quantisation of it: weights per channel,
    activations quantised per batch at run time, every MatMul but the feed-forward down-projections.

    Measured on 300 eft_test queries with the default model (one thread): float 7.9 ms a query; all
    MatMuls int8 3.7 ms, cosine to float min 0.983 / mean 0.993; down-projections kept float 4.9 ms,
    min 0.994 / mean 0.997 (their inputs, after GELU, carry the outliers int8 handles worst); per-tensor
    instead of per-channel scales: min 0.911.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    down = [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
            and "attention" not in n.name]
    out = path.with_name("int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice about pre-processing to the root logger
    try:
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=down,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    os.replace(out, path)


def _compare(encoder: PIEEncoder, directory: Path, meta: OnnxMeta) -> tuple[float, float]:
    """Largest difference and smallest cosine between torch's and the ONNX copy's vectors of the probe
    prompts, one by one and as one padded batch (the long probe also checks that both tokenizers
    truncate alike).

    Raises:
        ValueError: the two tokenizers give different ids for a probe.
    """
    import torch

    runtime = OnnxRuntime(directory, meta)
    tokenizer = FastTokenizer(directory / TOKENIZER_FILE, meta.pad_id)
    prompts = encoder.format(_PROBES[:-1]) + [_PROBES[-1]]
    max_length = encoder.config.max_length
    if tokenizer.ids(prompts, max_length=max_length) != [list(r) for r in encoder._token_ids(prompts)]:
        raise ValueError("tokenizer.json and the model's tokenizer disagree on the probe prompts")
    with torch.inference_mode():
        expected = np.concatenate([encoder.embed([p]).cpu().numpy() for p in prompts])
    worst, cosine = 0.0, 1.0
    for rows in [[i] for i in range(len(prompts))] + [list(range(len(prompts)))]:
        got = runtime.run(*tokenizer.batch([prompts[i] for i in rows], max_length))
        worst = max(worst, float(np.abs(got - expected[rows]).max()))
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected[rows], axis=1)
        cosine = min(cosine, float(((got * expected[rows]).sum(1) / np.maximum(norms, 1e-12)).min()))
    return worst, cosine
