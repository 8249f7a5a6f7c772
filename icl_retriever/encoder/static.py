"""Static topic vectors: IDF-weighted word-piece embeddings of a text, no forward pass.

A topic vector only has to say which of a few demos of the query's task share its content (the same
entities, words, subject), which a bag of word-piece embeddings captures at almost no cost, where the
default contextual vectors (a full forward pass of the base model over instruction + input) double the
work of every build (``topic="static"``; docs/benchmarks.md, "Static topic vectors as the content signal", for what it costs
downstream). The table is the base model's own (all-MiniLM-L6-v2's
``embeddings.word_embeddings``, frozen during PIE training), read from its safetensors file with numpy;
neither torch nor ONNX Runtime is needed. Each distinct word piece of the text counts once, weighted by
its inverse document frequency in our training instructions (``default_model/topic_idf.npy``, made by
``scripts/topic_idf.py``): a plain mean is dominated by punctuation and function words (unrelated demos
of the default pool score 0.54 on average, markdown tables above 0.9 whatever they hold; weighted: 0.24).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_retriever.default_model import BASE_SHA256
from icl_retriever.encoder.config import EncoderConfig, char_budget
from icl_retriever.errors import ModelLoadError

#: Name of the kind of vector, hashed into the fingerprint (a new way of pooling is a new kind).
KIND = "static-idf-v1"
#: Word pieces read of each text (the contextual topic encoder's budget).
MAX_TOKENS = 256
#: Inverse document frequency of every word piece of the packaged base's vocabulary (float32 .npy).
IDF_FILE = Path(__file__).resolve().parents[1] / "default_model" / "topic_idf.npy"
#: Tensor names of the input embedding table, by model family.
_TABLE_NAMES = ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight")


class StaticEmbedder:
    """Unit-length IDF-weighted sum of the distinct word-piece embeddings of each text (special tokens
    left out).

    It has the part of :class:`~icl_retriever.encoder.PIEEncoder`'s interface that topic vectors use:
    :meth:`encode`, :attr:`dim`, :attr:`fingerprint` and :attr:`config`. A text without any word piece
    (empty) gets the zero vector: cosine 0 to everything.
    """

    runtime = "static"

    def __init__(self, model: str = "default-base") -> None:
        self._table, self._tokenizer = load_table(model)
        self._tokenizer.enable_truncation(MAX_TOKENS)
        try:
            idf = np.load(IDF_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{IDF_FILE}: cannot read the word-piece IDF table ({exc}); reinstall") from exc
        if idf.shape != (len(self._table),) or idf.dtype != np.float32 or not np.isfinite(idf).all():
            raise ModelLoadError(
                f"{IDF_FILE}: expected {len(self._table)} finite float32 weights, got {idf.shape} {idf.dtype}"
            )
        self._idf = idf
        self._lock = threading.Lock()  # a tokenizers.Tokenizer with truncation is not for two threads at once
        self.config = EncoderConfig(model=model, template="{instruction}", pooling="mean", max_length=MAX_TOKENS)
        payload = json.dumps({
            "kind": KIND,
            "weights_sha256": BASE_SHA256,  # load_table reads the packaged base only, verified against it
            "tokenizer_sha256": hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest(),
            "idf_sha256": hashlib.sha256(idf.tobytes()).hexdigest(),
            "max_tokens": MAX_TOKENS,
        }, sort_keys=True)
        self.fingerprint = "sha256:" + hashlib.sha256(payload.encode()).hexdigest()
        self.runtime_model = self  # what a retriever locks per model
        #: Leading characters of a text read: its first MAX_TOKENS word pieces lie within them (ordinary text).
        self.text_limit = char_budget(MAX_TOKENS)

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        return int(self._table.shape[1])

    #: Texts a build hands over at a time (no forward pass: any size is fast).
    default_batch_size = 256

    def encode(
        self, texts: str | Sequence[str], batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """Unit vectors ``(len(texts), dim)`` float32, or ``(dim,)`` for one string; ``batch_size`` and
        ``show_progress_bar`` are accepted for the encoders' interface (a thousand texts take ~50 ms)."""
        del batch_size, show_progress_bar
        if isinstance(texts, str):
            return self.encode([texts])[0]
        heads = [text[: self.text_limit] for text in texts]  # what lies past them is never tokenised
        with self._lock:
            encodings = self._tokenizer.encode_batch(heads, add_special_tokens=False)
        out = np.zeros((len(encodings), self.dim), dtype=np.float32)
        for row, enc in enumerate(encodings):
            pieces = np.unique(np.asarray(enc.ids, dtype=np.int64))
            if len(pieces):
                out[row] = self._idf[pieces] @ self._table[pieces]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def load_table(model: str) -> tuple[np.ndarray, Any]:
    """The input word-piece table ``(vocab, dim)`` float32 of ``model`` and its tokenizer (no padding,
    no truncation); the packaged base only.

    Raises:
        ModelLoadError: another model, or its files are missing or hold no such table.
    """
    from safetensors import safe_open
    from tokenizers import Tokenizer

    directory = _model_dir(model)
    weights, tokenizer_file = directory / "model.safetensors", directory / "tokenizer.json"
    if not weights.is_file() or not tokenizer_file.is_file():
        raise ModelLoadError(f"{directory}: static topic vectors need model.safetensors and tokenizer.json")
    with safe_open(str(weights), framework="numpy") as f:
        name = next((n for n in _TABLE_NAMES if n in f.keys()), None)
        if name is None:
            raise ModelLoadError(f"{weights}: no word embedding table (looked for {', '.join(_TABLE_NAMES)})")
        table = np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return table, tokenizer


def idf_table(documents: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """``ln((N + 1) / (df + 1)) + 1`` of every word piece over ``documents`` (word-piece id lists)."""
    df = np.zeros(vocab_size, dtype=np.float64)
    for ids in documents:
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    return (np.log((len(documents) + 1) / (df + 1)) + 1).astype(np.float32)


def _model_dir(model: str) -> Path:
    if model != "default-base":
        raise ModelLoadError(f"static topic vectors are made from the packaged base model only, not {model!r}")
    from icl_retriever.default_model import base_model_dir

    return base_model_dir()  # its weights verified against the pinned sha256
