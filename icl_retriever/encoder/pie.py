"""The PIE encoder: wrap each instruction in a task-eliciting template, pool, normalise.

Prompt-based Instruction Embedding (Li et al., NeurIPS 2024) asks the model for the *task* of an
instruction instead of its topic, so "Write a poem about the sea" lands next to "Write a poem about
autumn" rather than next to "Tell me facts about the sea".
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm.auto import tqdm

from icl_retriever import presets
from icl_retriever.calibration import floor_for
from icl_retriever.encoder.config import (
    TEMPLATES,
    EncoderConfig,
    Pooling,
    Runtime,
    apply_template,
    char_budget,
    cut_to_budget,
    resolve_template,
)
from icl_retriever.encoder.loading import (
    cuda_visible,
    hash_state_dict,
    is_decoder_config,
    load_model,
    quantize_dynamic_int8,
    saved_settings,
)
from icl_retriever.encoder.pooling import pool

if TYPE_CHECKING:
    import torch

    from icl_retriever.encoder.onnx import FastTokenizer, OnnxMeta, OnnxRuntime

logger = logging.getLogger(__name__)


class PIEEncoder:
    """Embed instructions by task with a prompt-based instruction embedding.

    Examples:
        >>> enc = PIEEncoder()                      # the embedded, PIE-trained default; offline
        >>> fine = PIEEncoder("ieb")                # the preset of the PIE paper's fine-grained tasks
        >>> X = enc.encode(["Summarize the article below."])
        >>> X.shape, X.dtype                        # rows are L2-normalised
        ((1, 384), dtype('float32'))

    Args:
        model: a packaged preset (:mod:`icl_retriever.presets`): ``None``/``"default"`` for the default,
            ``"ieb"`` for the PIE paper's fine-grained tasks, ``"default-base"`` for the untrained base; or a
            local model directory, or a Hugging Face id (``owner/name``). A bare name that is neither a preset
            nor an existing directory is an error listing the presets.
        template: a name from :data:`TEMPLATES` or a string with ``{instruction}``. Defaults to the
            setting saved with the model, else ``"short"`` for encoders and ``"pie"`` for decoders.
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (last real token; the default for decoders).
        max_length: token budget for a prompt; longer instructions are truncated with a warning.
        add_period: PIE's rule of ending the instruction with a period; defaults to True for ``"pie"``.
        device: ``"cuda"``, ``"cpu"``, ...; defaults to CUDA when available.
        quantize: int8 weights (CPU only; faster, slightly different vectors, so it is part of the
            fingerprint: an index built with it is queried with it). On torch: dynamic int8 Linear layers;
            on ONNX: ONNX Runtime's dynamic per-channel int8 (another scheme, another fingerprint).
        runtime: ``"torch"``; ``"onnx"``: ONNX Runtime on CPU, float32 (the same vectors within
            :data:`~icl_retriever.encoder.onnx_export.TOLERANCE`; exported once with torch and cached, later
            loads import neither torch nor transformers); ``"auto"``: ONNX when the model can run there
            (CPU: ``device="cpu"``, or no device given and no GPU visible; an encoder-only local or default
            model; ``onnxruntime`` installed), torch otherwise. Training needs ``"torch"``.

    Raises:
        ModelLoadError: the model cannot be found, verified or loaded.
        ValueError: ``quantize`` with a non-CPU device; ``runtime="onnx"`` where ONNX cannot run.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        template: str | None = None,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        add_period: bool | None = None,
        device: str | torch.device | None = None,
        quantize: bool = False,
        runtime: Runtime = "torch",
    ) -> None:
        if runtime not in ("auto", "torch", "onnx"):
            raise ValueError(f"runtime must be 'auto', 'torch' or 'onnx', got {runtime!r}")
        on_cpu = str(device).split(":")[0] == "cpu" if device is not None else not cuda_visible()
        if quantize and not on_cpu:
            raise ValueError(f"quantize=True runs on CPU only, not on {device!r}")
        if runtime == "onnx" and not on_cpu:
            raise ValueError("runtime='onnx' runs on CPU: it excludes other devices")
        name = presets.resolve_name(model)  # a preset, an absolute local path or a hub id; else a one-line error
        settings = dict(template=template, pooling=pooling, max_length=max_length, add_period=add_period)
        self._onnx: OnnxRuntime | None = None
        self._fast: FastTokenizer | None = None
        self.model: Any = None
        if runtime != "torch" and on_cpu:
            if self._load_onnx(name, settings, quantize=quantize, required=runtime == "onnx"):
                return
        self.tokenizer, self.model, saved = load_model(name)
        self.is_decoder = is_decoder_config(self.model.config)
        self.model_max_length = int(min(getattr(self.tokenizer, "model_max_length", 512) or 512, 1_000_000))
        self._dim = int(self.model.config.hidden_size)
        scheme: Literal["torch", "onnx"] = "onnx" if runtime != "torch" else "torch"
        self._configure(name, saved, quantize=quantize, scheme=scheme, **settings)
        self._weights_sha = hash_state_dict(self.model)  # of the float weights, before any quantisation
        import torch

        if quantize:
            device = "cpu"
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.model.eval()
        self._set_budget()
        if runtime != "torch" and self.device.type == "cpu" and self._export_onnx(required=runtime == "onnx"):
            return
        if quantize:
            self.config = self.config.model_copy(update={"quantize_scheme": "torch"})
            self.model = quantize_dynamic_int8(self.model)

    def _configure(
        self,
        name: str,
        saved: dict[str, Any],
        *,
        template: str | None,
        pooling: Pooling | None,
        max_length: int | None,
        add_period: bool | None,
        quantize: bool,
        scheme: Literal["torch", "onnx"],
    ) -> None:
        """Settle the settings: arguments, else those saved with the model, else the defaults."""
        template_name = template or saved.get("template") or ("pie" if self.is_decoder else "short")
        resolved = resolve_template(template_name)
        self.config = EncoderConfig(
            model=name,
            template=resolved,
            pooling=pooling or saved.get("pooling") or ("last" if self.is_decoder else "mean"),
            max_length=min(int(max_length or saved.get("max_length") or 256), self.model_max_length),
            add_period=add_period if add_period is not None else saved.get("add_period", resolved == TEMPLATES["pie"]),
            quantize=quantize,
            quantize_scheme=scheme,
        )

    def _set_budget(self) -> None:
        """Template tokens (plus specials) that every prompt spends; the rest is the instruction's budget."""
        probe = self._token_ids([apply_template("", self.config.template, False)])[0]
        self._instruction_budget = max(1, self.config.max_length - len(probe))

    def _load_onnx(self, name: str, settings: dict[str, Any], *, quantize: bool, required: bool) -> bool:
        """Set this encoder up from a cached ONNX export of ``name``; False if there is none (yet)."""
        from icl_retriever.encoder import onnx as onnx_backend

        if not onnx_backend.available():
            if required:
                raise ValueError("runtime='onnx' needs onnxruntime and tokenizers: pip install onnxruntime tokenizers")
            return False
        saved = saved_settings(name)
        if saved is None:
            if required:
                raise ValueError(f"runtime='onnx': {name!r} is not a local model directory or the default")
            return False
        found = onnx_backend.find(name, settings["pooling"] or saved.get("pooling") or "mean", True, int8=quantize)
        if found is None:
            return False
        where, meta = found
        self._start_onnx(where, meta)
        self.is_decoder = False
        self.model_max_length = meta.model_max_length
        self._dim = meta.dim
        self._configure(name, saved, quantize=quantize, scheme="onnx", **settings)
        self._weights_sha = meta.weights_sha256
        self._set_budget()
        return True

    def _start_onnx(self, where: Path, meta: OnnxMeta) -> None:
        from icl_retriever.encoder import onnx as onnx_backend

        self._fast = onnx_backend.FastTokenizer(where / onnx_backend.TOKENIZER_FILE, meta.pad_id)
        self._onnx = onnx_backend.OnnxRuntime(where, meta)
        self.model = None  # one runtime per encoder: the torch weights, if loaded for the export, are let go
        self.tokenizer = self._fast
        self.device = "cpu"

    def _export_onnx(self, *, required: bool) -> bool:
        """Export this (float) torch encoder to the ONNX cache and run on it from now on; False if it
        cannot be exported (``auto``: it stays on torch, with a note saying why)."""
        from icl_retriever.encoder import onnx as onnx_backend

        c = self.config
        try:
            if not onnx_backend.available():
                raise ValueError("onnxruntime or tokenizers is not installed")
            from icl_retriever.encoder.onnx_export import export

            where, meta = export(self, int8=c.quantize)  # __init__ found no cached copy
            if meta.weights_sha256 != self._weights_sha:
                raise ValueError(f"the cached ONNX copy at {where} holds other weights")
            self._start_onnx(where, meta)
            return True
        except Exception as exc:  # export failures are many kinds (torch.onnx, onnxruntime, files)
            if required:
                raise ValueError(f"runtime='onnx': {c.model!r} cannot run on ONNX: {exc}") from exc
            # a model ONNX does not take (a decoder, a hub id) is expected news; a failed export is not
            log = logger.info if isinstance(exc, ValueError) else logger.warning
            log("model %r runs on torch: no ONNX copy (%s)", c.model, exc)
            return False

    @property
    def runtime_model(self) -> Any:
        """The object that computes vectors (torch module or ONNX session); shared by template copies."""
        return self._onnx if self._onnx is not None else self.model

    @property
    def runtime(self) -> Literal["torch", "onnx"]:
        """Where vectors are computed now."""
        return "onnx" if self._onnx is not None else "torch"

    @classmethod
    def from_config(
        cls, config: EncoderConfig, *, device: str | torch.device | None = None, runtime: Runtime = "torch"
    ) -> PIEEncoder:
        """The encoder a saved :class:`EncoderConfig` describes (an index manifest holds one)."""
        return cls(
            config.model,
            template=config.template,
            pooling=config.pooling,
            max_length=config.max_length,
            add_period=config.add_period,
            quantize=config.quantize,
            device=device,
            # int8 vectors are only reproduced by the scheme that made them
            runtime=runtime if not config.quantize else "onnx" if config.quantize_scheme == "onnx" else "torch",
        )

    @property
    def fingerprint(self) -> str:
        """Identity of weights + settings; an index only accepts queries from the same fingerprint."""
        payload = json.dumps(
            # quantize is left out while off, so fingerprints of float encoders are what they always were
            {
                "weights_sha256": self._weights_sha,
                **self.config.model_dump(exclude={"model"} | self._unfingerprinted()),
            },
            sort_keys=True,
        )
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    def _unfingerprinted(self) -> set[str]:
        """Settings left out of the fingerprint while at their old defaults, so fingerprints made before
        they existed still match: float encoders, and torch's int8 scheme."""
        if not self.config.quantize:
            return {"quantize", "quantize_scheme"}
        return {"quantize_scheme"} if self.config.quantize_scheme == "torch" else set()

    def calibrated_floor(self) -> float:
        """The cosine floor of ``min_score="auto"`` measured for this model (``calibration.json`` beside its
        weights; :func:`icl_retriever.calibration.floor_for`).

        Raises:
            ValueError: the model carries no calibration, or one made for other weights or settings.
        """
        return floor_for(self.config.model, self.fingerprint)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def text_limit(self) -> int:
        """Leading characters of a text that decide its embedding: text past them is never read (a text
        longer than this is cut to its first tokens within them; see :func:`.config.cut_to_budget`)."""
        return char_budget(self._instruction_budget)

    def _token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompts as the model sees them: special tokens added, cut to ``max_length``."""
        if self._fast is not None:
            return self._fast.ids(prompts, max_length=self.config.max_length)
        return self.tokenizer(
            list(prompts), truncation=True, max_length=self.config.max_length,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]

    def _offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character span of every token of each text (no special tokens, no truncation)."""
        if self._fast is not None:
            return self._fast.offsets(texts)
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        return enc["offset_mapping"]

    def format(self, instructions: Sequence[str]) -> list[str]:
        """Return the prompts the model sees, instructions truncated to the token budget."""
        return [apply_template(text, self.config.template, self.config.add_period) for text in self._fit(instructions)]

    def _fit(self, instructions: Sequence[str]) -> list[str]:
        """Cut instructions that would overflow ``max_length`` so the template's ending survives."""
        out, cut = cut_to_budget(instructions, self._instruction_budget, self._offsets)
        if cut:
            warnings.warn(
                f"{cut} instruction(s) longer than the encoder's {self.config.max_length}-token limit were truncated",
                stacklevel=3,
            )
        return out

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Pooled (and normalised) embeddings of already-formatted prompts; keeps the autograd graph.

        Training calls this directly; :meth:`encode` wraps it in batching and inference mode.

        Raises:
            ValueError: the encoder runs on ONNX (no autograd there; load it with ``runtime="torch"``).
        """
        if self.model is None:
            raise ValueError("embed() needs the torch runtime (PIEEncoder(..., runtime='torch')); this one runs on ONNX")
        batch = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        return self.pool(hidden, batch["attention_mask"])

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool token states ``(batch, tokens, dim)`` into one vector per prompt (:func:`.pooling.pool`)."""
        return pool(hidden, mask, self.config.pooling, normalize=self.config.normalize)

    def encode(
        self,
        instructions: str | Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        apply_template: bool = True,
    ) -> np.ndarray:
        """Embed instructions.

        Args:
            instructions: one instruction or a sequence of them.
            batch_size: prompts per forward pass (``None``: :attr:`default_batch_size`); inputs are sorted
                by length so batches pad little.
            show_progress_bar: ``None`` shows it when logging is at INFO or lower.
            apply_template: ``False`` embeds the raw text (the model's plain, topical embedding).

        Returns:
            float32 array of shape ``(n, dim)`` (``(dim,)`` for a single string), rows L2-normalised.
        """
        single = isinstance(instructions, str)
        texts = [instructions] if single else list(instructions)
        if batch_size is None:
            batch_size = self.default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"instruction {i} is {type(t).__name__}, expected str")
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        prompts = self.format(texts) if apply_template else self._fit(texts)
        out = np.empty((len(prompts), self.dim), dtype=np.float32)
        batches = tqdm(
            range(0, len(prompts), batch_size),
            desc="Encoding",
            unit="batch",
            disable=not show_progress_bar or len(prompts) <= batch_size,
        )
        if self._onnx is not None and self._fast is not None:
            # one tokenizer pass serves both the length order and the batches
            ids = self._fast.ids(prompts, max_length=self.config.max_length)
            order = np.argsort([-len(r) for r in ids], kind="stable") if len(ids) > batch_size else np.arange(len(ids))
            rows = [order[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
            tokens = [self._fast.pad([ids[i] for i in idx]) for idx in rows]
            for idx, vectors in zip(rows, self._onnx.run_many(tokens), strict=True):
                out[idx] = vectors
                batches.update()
            batches.close()
            return out[0] if single else out
        import torch

        order = self._length_order(prompts, batch_size)
        with torch.inference_mode():
            for start in batches:
                idx = order[start : start + batch_size]
                out[idx] = self.embed([prompts[i] for i in idx]).cpu().numpy()
        return out[0] if single else out

    @property
    def default_batch_size(self) -> int:
        """Prompts per forward pass when none is given: 16 on ONNX Runtime (fastest on CPU, measured in
        ``benchmarks/onnx_settings.py``), 32 on torch (as before; on a GPU larger batches pay, so pass one)."""
        from icl_retriever.encoder.onnx import BATCH_SIZE

        return BATCH_SIZE if self._onnx is not None else 32

    def _length_order(self, prompts: Sequence[str], batch_size: int) -> np.ndarray:
        """Prompts longest first by token count, so each batch pads little.

        Token counts, not characters: on eft_test, batches of 32 sorted by characters hold 37-50% padding,
        sorted by tokens 6-8%. Counting costs one tokenizer pass (about 1% of the model's time); a single
        batch needs no order.
        """
        if len(prompts) <= batch_size:
            return np.arange(len(prompts))
        ids = self._token_ids(prompts)
        return np.argsort([-len(x) for x in ids], kind="stable")

    def with_template(self, template: str, *, add_period: bool = False) -> PIEEncoder:
        """This encoder with another template, sharing the loaded tokenizer and model (weights are not copied).

        ``with_template("plain")`` gives the model's plain embedding of the raw text (topic vectors).
        """
        other = copy.copy(self)
        resolved = resolve_template(template)
        other.config = self.config.model_copy(update={"template": resolved, "add_period": add_period})
        other._set_budget()
        return other

    def __repr__(self) -> str:
        c = self.config
        return (
            f"PIEEncoder(model={c.model!r}, pooling={c.pooling!r}, max_length={c.max_length}, device={self.device}, "
            f"runtime={self.runtime!r})"
        )
