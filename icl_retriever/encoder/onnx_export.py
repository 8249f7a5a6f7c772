"""Exporting an encoder to the ONNX cache (see :mod:`icl_retriever.encoder.onnx` for why): once per model
files and pooling, with torch, checked against torch on probe prompts before it is used."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock, Timeout

from icl_retriever.encoder.onnx import (
    FORMAT,
    META_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    FastTokenizer,
    OnnxMeta,
    OnnxRuntime,
    _stat,
    entry_dir,
    find,
    source_files,
)

if TYPE_CHECKING:
    from icl_retriever.encoder import PIEEncoder

logger = logging.getLogger(__name__)

#: How long a process waits for another one exporting the same model (an export takes a minute or two).
EXPORT_WAIT_S = 1800.0
#: Largest absolute difference, per vector component, allowed between the float ONNX copy and torch.
TOLERANCE = 1e-4
#: Smallest cosine allowed between an int8 ONNX copy's vectors and torch's float vectors on the probes.
INT8_MIN_COSINE = 0.98
_PROBES = [
    "Summarize the article below.",
    "Write a SQL query that lists customers from Spain.",
    "x",
    "Translate this text into German, keeping the names as they are: " + "word " * 400,
]


def export(encoder: PIEEncoder, *, int8: bool = False) -> tuple[Path, OnnxMeta]:
    """Export a float torch encoder's model and pooling to the ONNX cache, checked against torch on probes;
    with ``int8``, then quantised by ONNX Runtime (dynamic, per-channel int8 weights of every MatMul).

    Raises:
        ValueError: the model cannot be exported (no ``tokenizer.json``, a decoder, not cacheable) or its
            ONNX copy differs from torch by more than :data:`TOLERANCE` (int8: a cosine below
            :data:`INT8_MIN_COSINE`).
    """
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

    where.parent.mkdir(parents=True, exist_ok=True)
    # one export of an entry at a time, across processes: the others wait, then use the one it made
    try:
        with FileLock(str(where.parent / f".{where.name}.lock"), timeout=EXPORT_WAIT_S):
            found = find(config.model, config.pooling, config.normalize, int8=int8)
            if found is not None:
                return found
            return _export_into(encoder, where, tok, source, int8=int8)
    except Timeout:
        raise ValueError(f"{config.model!r}: another process has been exporting it for {EXPORT_WAIT_S:g} s") from None


def _export_into(encoder: PIEEncoder, where: Path, tok: Any, source: list[Any], *, int8: bool) -> tuple[Path, OnnxMeta]:
    """:func:`export`'s work, under the entry's lock: export into a private temporary directory, check,
    then rename it into place."""
    config = encoder.config
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=where.parent))
    try:
        # float: eager attention, so ONNX Runtime's optimizer can fuse each layer into a few kernels; int8
        # keeps the graph its quantisation was measured on (same vectors as every earlier int8 export)
        fused = not int8 and _torch_export(encoder, tmp / ONNX_FILE, eager=True) and _fuse(encoder, tmp / ONNX_FILE)
        if not fused:
            _torch_export(encoder, tmp / ONNX_FILE, eager=False)
        (tmp / TOKENIZER_FILE).write_text(tok.to_str(), encoding="utf-8")
        pad_id = encoder.tokenizer.pad_token_id
        meta = OnnxMeta(
            format=FORMAT, model=config.model, source=source, pooling=config.pooling, normalize=config.normalize,
            weights_sha256=encoder._weights_sha, dim=encoder.dim, model_max_length=encoder.model_max_length,
            pad_id=int(pad_id), onnx_size=(tmp / ONNX_FILE).stat().st_size, max_abs_diff=0.0, fused=fused,
        )
        diff, cosine = _compare(encoder, tmp, meta)
        if fused and not diff <= TOLERANCE:  # the fusions moved the numbers: the plain graph instead
            logger.info("%r: the fused ONNX graph differs from torch by %.1e; using the unfused one", config.model, diff)
            _torch_export(encoder, tmp / ONNX_FILE, eager=False)
            meta = meta.model_copy(update={"fused": False, "onnx_size": (tmp / ONNX_FILE).stat().st_size})
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
            if found is not None:  # an export that took no lock (an older version) won; theirs is as good
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


def _torch_export(encoder: PIEEncoder, path: Path, *, eager: bool) -> bool:
    """Trace the model and its pooling into ``path`` (opset 17, dynamic batch and length); with ``eager``,
    through the model's eager attention (restored afterwards). Returns True."""
    import torch

    model = encoder.model

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return encoder.pool(hidden, attention_mask)

    before = getattr(model.config, "_attn_implementation", None)
    sample = encoder.tokenizer(["a b c", "a"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}}
    try:
        if eager and before not in (None, "eager"):
            model.set_attn_implementation("eager")
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow; _compare checks the result
            torch.onnx.export(
                Pooled().eval(), args, str(path), input_names=["input_ids", "attention_mask"],
                output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False,
            )
    finally:
        if eager and before not in (None, "eager"):
            model.set_attn_implementation(before)
    return True


def _fuse(encoder: PIEEncoder, path: Path) -> bool:
    """Rewrite ``path`` with ONNX Runtime's transformer optimizer (attention, layer norm and GELU fused:
    about 700 small operators become about 70 for MiniLM-L6); False, leaving it, if nothing fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = encoder.model.config
    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    if not heads or not hidden:
        return False
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimizer logs its progress to the root logger
    try:
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
    except Exception as exc:  # an architecture the optimizer does not know: the plain graph serves
        logger.info("%r: ONNX Runtime's optimizer could not fuse the graph (%s)", encoder.config.model, exc)
        return False
    finally:
        root.setLevel(level)
    if not optimized.get_fused_operator_statistics().get("Attention"):
        return False
    optimized.save_model_to_file(str(path))
    return True


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
