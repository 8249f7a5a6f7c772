"""The training loop of contrastive PIE fine-tuning: :func:`train` loads the start model, samples triplet
batches of every train file, optimises InfoNCE (with distillation to the start when asked), validates and
keeps the best checkpoint, then saves the model, its training card, its delta against a packaged preset and
its calibrated floor."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from icl_retriever import default_model, presets
from icl_retriever.cache import sha256_file
from icl_retriever.encoder import PIE_CONFIG_FILE, PIEEncoder
from icl_retriever.presets import CARD_FILE, DELTA_FILE
from icl_retriever.train_config import TrainConfig
from icl_retriever.training.loss import _batch_loss, _Source, _Teacher
from icl_retriever.training.tasks import TaskSet
from icl_retriever.training.validation import _held_out, _sources, _validate, write_calibration

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------- card


class TrainingCard(BaseModel):
    """What was trained from what, how, and how well: ``training_card.json`` in the output directory."""

    created: str
    versions: dict[str, str]
    base_model: str
    base_weights_sha256: str | None
    base_delta_sha256: str | None = Field(description="the packaged preset's delta training started from, if any")
    train_files: list[str]
    train_files_sha256: list[str]
    val_files: list[str] = Field(default_factory=list)
    anchors_per_batch: dict[str, int] = Field(default_factory=dict, description="train file -> anchors in each batch")
    template_text: str
    config: dict[str, Any]
    train_tasks: int
    train_instructions: int
    anchor_instructions: int
    val_tasks: int
    val_instructions: int
    steps_done: int
    wall_time_s: float
    seconds_per_step: float = Field(description="optimisation time per step, validation excluded")
    final_train_loss: float = Field(description="mean loss of the last min(20, steps) steps")
    validation_before: dict[str, float] | None
    validation: dict[str, float] | None = Field(description="metrics of the saved model")
    best_step: int | None
    validation_history: list[dict[str, float]]
    delta: dict[str, int] | None


# -------------------------------------------------------------------------------------------- train


def _freeze_embeddings(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.requires_grad_(False)


def _freeze_layers(model: torch.nn.Module, n: int) -> None:
    """Freeze the first ``n`` transformer layers (the model's stack of ``num_hidden_layers`` blocks)."""
    total = getattr(model.config, "num_hidden_layers", None)
    stack = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if stack is None:
        raise ValueError(f"freeze_layers: cannot find the {total} transformer layers of {type(model).__name__}")
    if n > len(stack):
        raise ValueError(f"freeze_layers={n}, but the model has {len(stack)} layers")
    for layer in stack[:n]:
        layer.requires_grad_(False)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (vectors), the usual transformer recipe."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def _save(encoder: PIEEncoder, out: Path) -> None:
    """Weights (transformers 5 always writes safetensors), tokenizer and PIE settings."""
    out.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"{out}: save_pretrained wrote no model.safetensors")
    settings = {k: encoder.config.model_dump()[k] for k in ("template", "pooling", "max_length", "add_period")}
    (out / PIE_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _save_default_delta(model: torch.nn.Module, path: Path) -> dict[str, int]:
    """trained - pure base weights, since loading the default adds the delta to the pure base."""
    from transformers import AutoModel

    base = AutoModel.from_pretrained(default_model.base_model_dir())
    return default_model.save_delta(model, base, path)


@dataclass
class _Fit:
    """What the optimisation loop leaves for the card."""

    losses: list[float]
    step_time: float
    history: list[dict[str, float]]
    best_step: int | None
    final: dict[str, float] | None


class _WeightAverage:
    """An exponential moving average of the trainable weights (``--ema``), as in Polyak averaging: the model
    validated and saved is the average over roughly the last ``1 / (1 - decay)`` steps rather than the last
    step, whose held-out figures swing from one check to the next. The decay ramps up as
    ``min(decay, (1 + step) / (10 + step))`` so the first steps do not pin the average to the start."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for avg, p in zip(self.average, self.params, strict=True):
            avg.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the model for the block (to validate or copy it), the trained weights after."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained, strict=True):
                    p.copy_(w)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, avg in zip(self.params, self.average, strict=True):
            p.copy_(avg)


def _add_lora(model: torch.nn.Module, config: TrainConfig) -> Any:
    """Low-rank adapters (peft's LoRA) on every linear layer of the transformer stack; the rest is frozen.

    The adapters are injected into ``model`` in place, so the encoder trains and validates them as it is;
    the returned peft model merges them back into plain weights (``merge_and_unload``) before saving."""
    from peft import LoraConfig, get_peft_model  # train() checked that it is installed
    # Leaf names of the linear layers (BERT: query, key, value, dense); the pooler, which pooling skips, is not
    # adapted.
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if not targets:
        raise ValueError(f"lora_rank: {type(model).__name__} has no linear layers to adapt")
    alpha = config.lora_alpha or 2.0 * config.lora_rank
    lora = LoraConfig(r=config.lora_rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                      exclude_modules=r".*pooler.*")
    with warnings.catch_warnings():  # peft asks transformers 5 a question it has renamed; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _load_encoder(config: TrainConfig) -> PIEEncoder:
    encoder = PIEEncoder(
        config.base_model,
        template=config.template,
        pooling=config.pooling,
        max_length=config.max_length,
        add_period=config.add_period,
        device=config.device,
    )
    if config.freeze_embeddings:
        _freeze_embeddings(encoder.model)
    if config.freeze_layers:
        _freeze_layers(encoder.model, config.freeze_layers)
    return encoder


def _fit(
    encoder: PIEEncoder,
    sources: Sequence[_Source],
    prompts: Mapping[str, str],
    held_out: Sequence[tuple[str, TaskSet]],
    config: TrainConfig,
    total: int,
    show_progress_bar: bool,
) -> _Fit:
    """Run ``total`` optimizer steps; with ``eval_every``, end on the best-validating checkpoint."""
    from transformers import get_linear_schedule_with_warmup

    teacher = _Teacher(encoder) if config.distill > 0 else None
    optimizer = _optimizer(encoder.model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    fit = _Fit(losses=[], step_time=0.0, history=[], best_step=None, final=None)
    best: tuple[tuple[float, float], dict[str, torch.Tensor]] | None = None
    ema = _WeightAverage(encoder.model, config.ema) if config.ema else None
    encoder.model.train(config.dropout)
    bar = tqdm(range(1, total + 1), desc="Training", unit="step", disable=not show_progress_bar)
    for step in bar:
        tick = time.perf_counter()
        step_loss = 0.0
        for _ in range(config.grad_accum):
            loss = _batch_loss(encoder, sources, config, prompts, teacher) / config.grad_accum
            loss.backward()
            step_loss += loss.item()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(step)
        fit.losses.append(step_loss)
        fit.step_time += time.perf_counter() - tick
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if held_out and config.eval_every and (step % config.eval_every == 0 or step == total):
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                metrics = _validate(encoder, held_out, config.batch_size)
                score = (metrics["score"], metrics["tiebreak"])
                improved = best is None or score > best[0]
                if improved:  # copied while the validated weights (the average, with --ema) are in the model
                    best = (score, {k: v.detach().clone() for k, v in encoder.model.state_dict().items()})
            fit.history.append({"step": step, **metrics})
            logger.info("step %d: validation %s", step, metrics)
            if show_progress_bar:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tiebreak")
                bar.write(f"step {step}: {shown}", file=sys.stderr)  # stdout is for the report (--json)
            if improved:
                fit.best_step, fit.final = step, fit.history[-1]
            elif config.patience and len(fit.history) - fit.history.index(fit.final or {}) > config.patience:
                logger.info("step %d: no better validation in %d checks; stopping early", step, config.patience)
                break
    bar.close()
    encoder.model.eval()
    if ema is not None and best is None:
        ema.copy_to_model()
    if best is not None:
        encoder.model.load_state_dict(best[1])
    elif held_out:
        fit.final = _validate(encoder, held_out, config.batch_size)
        fit.history.append({"step": total, **fit.final})
    return fit


def train(config: TrainConfig, *, show_progress_bar: bool = True) -> Path:
    """Fine-tune ``config.base_model`` contrastively on ``config.train_files``; return the output directory.

    Writes ``model.safetensors``, tokenizer files, ``pie_config.json``, ``training_card.json``,
    ``calibration.json`` (the floor of ``min_score="auto"``, measured on the held-out tasks) and, from
    a packaged preset (``default``, ``ieb``, ``default-base``), ``delta.safetensors``.

    Raises:
        PoolError: a train or validation file is missing or malformed.
        ModelLoadError: the base model cannot be loaded.
        ValueError: the data cannot support training (e.g. too few tasks for the validation split), or
            ``lora_rank`` without peft installed.
    """
    from transformers import set_seed

    started = time.perf_counter()
    if config.lora_rank and importlib.util.find_spec("peft") is None:  # before minutes of loading data and model
        raise ValueError('lora_rank needs peft: pip install "icl-retriever[lora]"')
    set_seed(config.seed)
    # Data: per train file, hold out whole tasks, then sample triplets from the rest.
    sources = _sources(config)
    held_out = _held_out(sources, config)
    anchors_per_step = config.batch_size * config.grad_accum
    n_anchors = sum(src.sampler.n_anchors for src in sources)
    total = config.steps or max(1, math.ceil((config.epochs or 0) * n_anchors / anchors_per_step))
    # Model, and every prompt formatted (and truncated, with one warning) up front.
    encoder = _load_encoder(config)
    adapters = _add_lora(encoder.model, config) if config.lora_rank else None
    texts = list(dict.fromkeys(t for src in sources for v in src.train.instructions.values() for t in v))
    prompts = dict(zip(texts, encoder.format(texts), strict=True))
    before = _validate(encoder, held_out, config.batch_size) if held_out else None
    fit = _fit(encoder, sources, prompts, held_out, config, total, show_progress_bar)
    if adapters is not None:  # plain weights again (W + B A x scale), so the output loads without peft
        encoder.model = adapters.merge_and_unload()
    # Outputs: the model directory, the shippable delta, the card.
    out = Path(config.output_dir)
    _save(encoder, out)
    write_calibration(PIEEncoder(out), config, out)  # as users load it: the saved weights and settings
    from_preset = presets.find(config.base_model) is not None  # any preset: the delta is to the packaged base
    delta = _save_default_delta(encoder.model, out / DELTA_FILE) if from_preset else None
    card = _card(config, encoder, sources, fit, before, delta, time.perf_counter() - started)
    (out / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return out


def _card(
    config: TrainConfig,
    encoder: PIEEncoder,
    sources: Sequence[_Source],
    fit: _Fit,
    before: dict[str, float] | None,
    delta: dict[str, int] | None,
    wall: float,
) -> TrainingCard:
    from transformers import __version__ as transformers_version

    preset = presets.find(config.base_model)
    shipped_delta = preset.delta_file if preset is not None else None
    steps = len(fit.losses)
    vals = [src.val for src in sources if src.val is not None]
    return TrainingCard(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        versions={"torch": torch.__version__, "transformers": transformers_version, "numpy": np.__version__},
        base_model=config.base_model,
        base_weights_sha256=default_model.BASE_SHA256 if preset is not None else None,
        base_delta_sha256=sha256_file(shipped_delta) if shipped_delta else None,
        train_files=[str(Path(p).resolve()) for p in config.train_files],
        train_files_sha256=[sha256_file(Path(p)) for p in config.train_files],
        val_files=[str(Path(p).resolve()) for p in config.val_files],
        anchors_per_batch={src.name: src.count for src in sources},
        template_text=encoder.config.template,
        config=config.model_dump(mode="json"),
        train_tasks=sum(len(src.train.instructions) for src in sources),
        train_instructions=sum(src.train.n_instructions for src in sources),
        anchor_instructions=sum(src.sampler.n_anchors for src in sources),
        val_tasks=sum(len(v.instructions) for v in vals),
        val_instructions=sum(v.n_instructions for v in vals),
        steps_done=steps,
        wall_time_s=round(wall, 2),
        seconds_per_step=round(fit.step_time / steps, 3),
        final_train_loss=float(np.mean(fit.losses[-20:])),
        validation_before=before,
        validation=fit.final,
        best_step=fit.best_step,
        validation_history=fit.history,
        delta=delta,
    )
