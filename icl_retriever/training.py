"""Contrastive PIE fine-tuning: pull instructions of one task together, push related tasks apart.

Each anchor instruction gets a positive (another instruction of its task) and a hard negative (an
instruction of a *different* task sharing its verb or noun, e.g. ``write|poem`` vs ``write|story``),
and the InfoNCE loss ranks the positive above every other positive and negative in the batch. Columns
that share the anchor's task are masked out, since they are not negatives at all. The output directory
loads with ``PIEEncoder(output_dir)``; from the packaged default it also holds a float16
``delta.safetensors`` that can be shipped as the new default.

Dropout is off by default: with real positives it is no longer needed as augmentation (SimCSE's use), and
on held-out tasks it measured worse (see :class:`TrainConfig`). Validation never touches test files: it
holds out whole tasks of the train file.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from icl_retriever import default_model
from icl_retriever.cache import sha256_file
from icl_retriever.encoder import PIE_CONFIG_FILE, PIEEncoder
from icl_retriever.errors import PoolError
from icl_retriever.datasets import iter_labelled
from icl_retriever.evaluation import cross_group_precision, ict_scores, retrieval_precision
from icl_retriever.train_config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSet",
    "TrainConfig",
    "TrainingCard",
    "Triplet",
    "TripletSampler",
    "info_nce",
    "load_task_set",
    "load_tasks",
    "parse_facets",
    "split_tasks",
    "train",
    "triplet_loss",
]

#: Prompts per forward pass in training. Prompts are length-sorted first, so small chunks pad little: on
#: 2 CPU cores a batch of 96 prompts (32 triplets) took 1.6 s in chunks of 16, 2.0 s in 32s, 6.5 s at once.
EMBED_CHUNK = 16
CARD_FILE = "training_card.json"
DELTA_FILE = "delta.safetensors"
#: A verb set and a noun set; tasks sharing either are each other's hard negatives.
Facets = tuple[frozenset[str], frozenset[str]]


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TaskSet:
    """Unique instructions per task, and each task's verbs and nouns for hard negatives."""

    instructions: dict[str, list[str]]
    facets: dict[str, Facets]
    #: task -> instruction -> group (e.g. SNI's source dataset); empty when the file has no groups.
    groups: dict[str, dict[str, str]] = field(default_factory=dict)

    def subset(self, tasks: Sequence[str]) -> TaskSet:
        """The same data restricted to ``tasks``."""
        return TaskSet(
            {t: self.instructions[t] for t in tasks},
            {t: self.facets[t] for t in tasks},
            {t: self.groups[t] for t in tasks if t in self.groups},
        )

    @property
    def n_instructions(self) -> int:
        """Instructions over all tasks."""
        return sum(len(v) for v in self.instructions.values())


def parse_facets(label: str) -> Facets:
    """Verbs and nouns of a label like ``write|poem`` or ``decide|statement##determine|statement``.

    A label without that shape has no facets, so it only gets random negatives.
    """
    verbs: set[str] = set()
    nouns: set[str] = set()
    for part in label.split("##"):
        pieces = [p.strip().lower() for p in part.split("|")]
        if len(pieces) == 2 and all(pieces):
            verbs.add(pieces[0])
            nouns.add(pieces[1])
    return frozenset(verbs), frozenset(nouns)


def load_task_set(path: str | Path, *, label_field: str | None = None, with_input: bool = False) -> TaskSet:
    """Read a train file: ``.jsonl``/``.ndjson`` as one ``{"instruction", "task"}`` per line, else IEB JSON;
    with ``label_field``, any demo pool labelled by that metadata field.

    Instructions are stripped and de-duplicated within a task. Facets come from ``verb|noun`` labels
    and, in IEB files, from each sample's ``category``; groups from each sample's ``dataset``. With
    ``with_input``, a sample with an input adds "instruction + input" as one more text of its task.

    Raises:
        PoolError: the file is missing, malformed (message gives the line for JSONL) or empty.
    """
    path = Path(path)
    records = iter_labelled(path, label_field=label_field)
    instructions: dict[str, dict[str, None]] = {}  # dict as an ordered set
    groups: dict[str, dict[str, str]] = {}
    verbs: dict[str, set[str]] = {}
    nouns: dict[str, set[str]] = {}
    for task, text, category, group, extra in records:
        texts = [text.strip()] + ([f"{text.strip()}\n\n{extra.strip()}"] if with_input and extra.strip() else [])
        for t in texts:
            instructions.setdefault(task, {})[t] = None
            if group:
                groups.setdefault(task, {})[t] = group
        task_verbs, task_nouns = parse_facets(task)
        verbs.setdefault(task, set()).update(task_verbs)
        nouns.setdefault(task, set()).update(task_nouns)
        if category:
            verbs[task].add(category[0].strip().lower())
            nouns[task].add(category[1].strip().lower())
    if not instructions:
        raise PoolError("no instructions found", path=str(path))
    return TaskSet(
        {t: list(v) for t, v in instructions.items()},
        {t: (frozenset(verbs[t]), frozenset(nouns[t])) for t in instructions},
        groups,
    )


def load_tasks(path: str | Path) -> dict[str, list[str]]:
    """Task -> unique instructions of a train file (see :func:`load_task_set` for formats and errors)."""
    return load_task_set(path).instructions


def split_tasks(tasks: TaskSet, val_fraction: float, seed: int) -> tuple[TaskSet, TaskSet | None]:
    """Hold out whole tasks for validation, so validation measures generalisation to unseen tasks.

    At least two tasks are held out when ``val_fraction > 0`` (ARI needs two labels).
    """
    names = list(tasks.instructions)
    if val_fraction <= 0:
        return tasks, None
    n_val = max(2, round(len(names) * val_fraction))
    if len(names) - n_val < 2:
        raise ValueError(f"{len(names)} tasks are too few to hold out {n_val} for validation; set val_fraction=0")
    random.Random(seed).shuffle(names)
    return tasks.subset(sorted(names[n_val:])), tasks.subset(sorted(names[:n_val]))


# ------------------------------------------------------------------------------------------ batches


class Triplet(NamedTuple):
    """An anchor, a positive of the same task and a hard negative of another task."""

    anchor: str
    positive: str
    negative: str
    task: str
    neg_task: str


class TripletSampler:
    """Endless, seeded stream of triplet batches over a task set.

    Anchors walk through every instruction of every task with at least two instructions, in a
    shuffled order per epoch; a batch takes each task at most once while enough distinct tasks exist,
    so in-batch positives of other anchors are true negatives.

    Args:
        tasks: task -> unique instructions.
        facets: task -> (verbs, nouns); defaults to :func:`parse_facets` of each task label.
        seed: makes the stream reproducible.
        share: what a hard negative's task shares with the anchor's.
        groups: task -> instruction -> group (source dataset). A positive then comes from another group
            when the task has one, so the model learns the task, not the dataset's wording.
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[str]],
        facets: Mapping[str, Facets] | None = None,
        *,
        seed: int = 0,
        share: Literal["verb_or_noun", "verb", "noun"] = "verb_or_noun",
        groups: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self._tasks = {t: list(v) for t, v in tasks.items() if v}
        self._groups = {t: dict(g) for t, g in (groups or {}).items()}
        if len(self._tasks) < 2:
            raise ValueError("need at least two tasks with instructions")
        self._anchor_tasks = [t for t, v in self._tasks.items() if len(v) >= 2]
        if not self._anchor_tasks:
            raise ValueError("no task has two instructions, so no anchor has a positive")
        facets = facets or {t: parse_facets(t) for t in self._tasks}
        self._related = _related_tasks({t: facets.get(t, (frozenset(), frozenset())) for t in self._tasks}, share)
        self._names = list(self._tasks)
        self._rng = random.Random(seed)
        self._queue: deque[tuple[str, int]] = deque()

    @property
    def n_anchors(self) -> int:
        """Anchors in one epoch: every instruction of a task that has a positive for it."""
        return sum(len(self._tasks[t]) for t in self._anchor_tasks)

    def batch(self, n: int) -> list[Triplet]:
        """The next ``n`` triplets."""
        chosen: list[tuple[str, int]] = []
        deferred: list[tuple[str, int]] = []
        seen: set[str] = set()
        while len(chosen) < n:
            if not self._queue:
                self._refill()
            task, index = self._queue.popleft()
            if task in seen and len(seen) < len(self._anchor_tasks):
                deferred.append((task, index))  # used first by the next batch
                continue
            chosen.append((task, index))
            seen.add(task)
        self._queue.extendleft(reversed(deferred))
        return [self._triplet(task, index) for task, index in chosen]

    def _refill(self) -> None:
        epoch = [(t, i) for t in self._anchor_tasks for i in range(len(self._tasks[t]))]
        self._rng.shuffle(epoch)
        self._queue.extend(epoch)

    def _other(self, n: int, skip: int) -> int:
        """A uniform index in range(n) other than ``skip``."""
        j = self._rng.randrange(n - 1)
        return j + 1 if j >= skip else j

    def _triplet(self, task: str, index: int) -> Triplet:
        texts = self._tasks[task]
        groups = self._groups.get(task)
        if groups and (others := [t for t in texts if groups.get(t) != groups.get(texts[index])]):
            positive = self._rng.choice(others)
        else:
            positive = texts[self._other(len(texts), index)]
        related = self._related[task]
        if related:
            neg_task = self._rng.choice(related)
        else:
            neg_task = self._names[self._other(len(self._names), self._names.index(task))]
        return Triplet(texts[index], positive, self._rng.choice(self._tasks[neg_task]), task, neg_task)


def _related_tasks(facets: Mapping[str, Facets], share: str = "verb_or_noun") -> dict[str, list[str]]:
    """Task -> other tasks sharing a verb and/or a noun, as ``share`` says (sorted, for reproducible sampling)."""
    by_verb: dict[str, set[str]] = {}
    by_noun: dict[str, set[str]] = {}
    for task, (verbs, nouns) in facets.items():
        for verb in verbs:
            by_verb.setdefault(verb, set()).add(task)
        for noun in nouns:
            by_noun.setdefault(noun, set()).add(task)
    related: dict[str, list[str]] = {}
    for task, (verbs, nouns) in facets.items():
        groups = [by_verb[v] for v in verbs if share != "noun"] + [by_noun[n] for n in nouns if share != "verb"]
        others = set().union(*groups) - {task}
        related[task] = sorted(others)
    return related


# --------------------------------------------------------------------------------------------- loss


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_tasks: Sequence[str],
    key_tasks: Sequence[str],
    temperature: float,
    mask_same_task: bool = True,
) -> torch.Tensor:
    """InfoNCE where query i's target is key i and every other key is a negative.

    With ``mask_same_task``, keys of the query's own task (other than key i) are removed from the
    softmax: another instruction of the same task is not a negative.
    """
    logits = queries @ keys.T / temperature
    targets = torch.arange(len(queries), device=queries.device)
    if mask_same_task:
        ids = {task: i for i, task in enumerate(dict.fromkeys([*query_tasks, *key_tasks]))}
        q = torch.tensor([ids[t] for t in query_tasks], device=logits.device)
        k = torch.tensor([ids[t] for t in key_tasks], device=logits.device)
        same = q[:, None] == k[None, :]
        same[targets, targets] = False
        logits = logits.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets)


def _embed(encoder: PIEEncoder, prompts: Sequence[str], chunk: int) -> torch.Tensor:
    """Embed with grad in length-sorted chunks (less padding), returned in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    parts = [encoder.embed([prompts[i] for i in order[s : s + chunk]]) for s in range(0, len(order), chunk)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def _texts(triplets: Sequence[Triplet], config: TrainConfig) -> list[str]:
    """Anchors, then positives, then (with hard negatives) negatives: the rows of one source's batch."""
    texts = [t.anchor for t in triplets] + [t.positive for t in triplets]
    return texts + [t.negative for t in triplets] if config.hard_negatives else texts


def _loss_of(emb: torch.Tensor, triplets: Sequence[Triplet], config: TrainConfig) -> torch.Tensor:
    """InfoNCE over in-batch positives (+ hard negatives) given the rows laid out by :func:`_texts`."""
    n = len(triplets)
    anchors, keys = emb[:n], emb[n:]
    tasks = [t.task for t in triplets]
    key_tasks = tasks + ([t.neg_task for t in triplets] if config.hard_negatives else [])
    loss = info_nce(anchors, keys, tasks, key_tasks, config.temperature, config.mask_same_task)
    if config.symmetric:
        backward = info_nce(keys[:n], anchors, tasks, tasks, config.temperature, config.mask_same_task)
        loss = (loss + backward) / 2
    return loss


def triplet_loss(
    encoder: PIEEncoder, triplets: Sequence[Triplet], config: TrainConfig, prompts: Mapping[str, str]
) -> torch.Tensor:
    """The training loss of one batch of one source: InfoNCE over in-batch positives (+ hard negatives)."""
    emb = _embed(encoder, [prompts[t] for t in _texts(triplets, config)], EMBED_CHUNK)
    return _loss_of(emb, triplets, config)


class _Teacher:
    """A frozen copy of the starting model; its embeddings anchor the trained ones (``distill``).

    Contrastive training on one notion of a task (IEB's ``verb|noun``) happily discards what the start
    knew about everything else; pulling each batch text towards where the start put it keeps that.
    """

    def __init__(self, encoder: PIEEncoder) -> None:
        self._encoder = copy.copy(encoder)
        self._encoder.model = copy.deepcopy(encoder.model).eval().requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.inference_mode():
                rows = _embed(self._encoder, missing, EMBED_CHUNK)
            self._cache.update(zip(missing, rows.clone(), strict=True))
        return torch.stack([self._cache[p] for p in prompts])


@dataclass
class _Source:
    """One train file: its training tasks, held-out tasks, sampler and anchors per batch."""

    name: str
    train: TaskSet
    val: TaskSet | None
    sampler: TripletSampler
    count: int


def _batch_loss(
    encoder: PIEEncoder,
    sources: Sequence[_Source],
    config: TrainConfig,
    prompts: Mapping[str, str],
    teacher: _Teacher | None,
) -> torch.Tensor:
    """One step's loss: each source's InfoNCE weighted by its anchors, plus the distillation term.

    Sources are ranked separately: a batch from IEB and one from SNI may hold the same task under two
    names (``summarize|article`` and ``Summarization``), which must not be each other's negatives.
    """
    batches = [(src, src.sampler.batch(src.count)) for src in sources]
    texts = [_texts(triplets, config) for _, triplets in batches]
    rows = [prompts[t] for part in texts for t in part]
    emb = _embed(encoder, rows, EMBED_CHUNK)
    loss = emb.new_zeros(())
    offset = 0
    for (src, triplets), part in zip(batches, texts, strict=True):
        loss = loss + src.count * _loss_of(emb[offset : offset + len(part)], triplets, config)
        offset += len(part)
    loss = loss / sum(src.count for src in sources)
    if teacher is not None and config.distill > 0:
        loss = loss + config.distill * (1 - (emb * teacher(rows).to(emb.device)).sum(-1)).mean()
    return loss


# --------------------------------------------------------------------------------------- validation


def _validate_set(encoder: PIEEncoder, tasks: TaskSet, batch_size: int) -> dict[str, float]:
    """P@1 and ARI on held-out tasks (plus cross-group P@1 when the tasks carry groups)."""
    texts = [t for v in tasks.instructions.values() for t in v]
    labels = [task for task, v in tasks.instructions.items() for _ in v]
    X = encoder.encode(texts, batch_size=batch_size, show_progress_bar=False)
    metrics = {"p_at_1": retrieval_precision(X, labels, texts, ks=(1,))[1], "ari": ict_scores(X, labels)["ari"]}
    if tasks.groups:
        groups = [tasks.groups.get(task, {}).get(t, f"?{task}") for task, v in tasks.instructions.items() for t in v]
        p_at_1, n = cross_group_precision(X, labels, groups)
        if n:
            metrics["cross_group_p_at_1"] = p_at_1
    return metrics


def _validate(
    encoder: PIEEncoder, held_out: Sequence[tuple[str, TaskSet]], batch_size: int
) -> dict[str, float]:
    """Metrics of every validation set as ``"<name>.<metric>"``, and ``score``, the mean of their P@1s.

    A set's P@1 is its cross-group P@1 when it has one (a task recognised across datasets), else
    leave-one-out P@1. The best checkpoint has the highest score; the first set's ARI breaks ties.
    """
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        per_set = {name: _validate_set(encoder, tasks, batch_size) for name, tasks in held_out}
    finally:
        encoder.model.train(was_training)
    out = {f"{name}.{k}": v for name, metrics in per_set.items() for k, v in metrics.items()}
    primary = [m.get("cross_group_p_at_1", m["p_at_1"]) for m in per_set.values()]
    out["score"] = float(np.mean(primary))
    out["tiebreak"] = next(iter(per_set.values()))["ari"]
    return out


# --------------------------------------------------------------------------------------------- card


class TrainingCard(BaseModel):
    """What was trained from what, how, and how well: ``training_card.json`` in the output directory."""

    created: str
    versions: dict[str, str]
    base_model: str
    base_weights_sha256: str | None
    base_delta_sha256: str | None = Field(description="shipped delta the default started from, if any")
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
        fit.losses.append(step_loss)
        fit.step_time += time.perf_counter() - tick
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if held_out and config.eval_every and (step % config.eval_every == 0 or step == total):
            metrics = _validate(encoder, held_out, config.batch_size)
            fit.history.append({"step": step, **metrics})
            logger.info("step %d: validation %s", step, metrics)
            if show_progress_bar:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tiebreak")
                bar.write(f"step {step}: {shown}", file=sys.stderr)  # stdout is for the report (--json)
            score = (metrics["score"], metrics["tiebreak"])
            if best is None or score > best[0]:
                best = (score, {k: v.detach().clone() for k, v in encoder.model.state_dict().items()})
                fit.best_step, fit.final = step, fit.history[-1]
            elif config.patience and len(fit.history) - fit.history.index(fit.final or {}) > config.patience:
                logger.info("step %d: no better validation in %d checks; stopping early", step, config.patience)
                break
    bar.close()
    encoder.model.eval()
    if best is not None:
        encoder.model.load_state_dict(best[1])
    elif held_out:
        fit.final = _validate(encoder, held_out, config.batch_size)
        fit.history.append({"step": total, **fit.final})
    return fit


def _shares(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Split ``batch_size`` anchors by ``weights`` (largest remainder), at least one per source."""
    raw = [batch_size * w / sum(weights) for w in weights]
    counts = [max(1, math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True):
        if sum(counts) >= batch_size:
            break
        counts[i] += 1
    return counts


def _sources(config: TrainConfig) -> list[_Source]:
    """Read, split and sample every train file; names are file stems (made unique)."""
    counts = _shares(config.batch_size, config.mix or [1.0] * len(config.train_files))
    sources: list[_Source] = []
    for i, (path, count) in enumerate(zip(config.train_files, counts, strict=True)):
        tasks = load_task_set(path, label_field=config.label_field, with_input=config.with_input)
        train_set, val_set = split_tasks(tasks, config.val_fraction, config.seed)
        sampler = TripletSampler(
            train_set.instructions, train_set.facets, seed=config.seed + i,
            share=config.hard_negative_facets, groups=train_set.groups,
        )
        stem = Path(path).stem
        name = stem if all(Path(o).stem != stem for o in config.train_files[:i]) else f"{stem}{i}"
        sources.append(_Source(name, train_set, val_set, sampler, count))
    return sources


def held_out_sets(config: TrainConfig) -> list[tuple[str, list[str], list[str]]]:
    """``(file name, instructions, task labels)`` of each train file's held-out tasks, instructions only:
    tasks the model never trained on, where its calibrated floor is measured."""
    sets = []
    for path in config.train_files:
        tasks = load_task_set(path, label_field=config.label_field)
        _, val = split_tasks(tasks, config.val_fraction, config.seed)
        if val is not None:
            pairs = [(text, task) for task, texts in val.instructions.items() for text in texts]
            sets.append((Path(path).name, [t for t, _ in pairs], [label for _, label in pairs]))
    return sets


def write_calibration(encoder: PIEEncoder, config: TrainConfig, out: Path) -> None:
    """Measure ``encoder``'s floor for ``min_score="auto"`` on the held-out tasks and save it in ``out``
    (logged, not raised, when the tasks cannot support one: ``"auto"`` then says the model has none)."""
    from icl_retriever import calibration

    sets = held_out_sets(config)
    try:
        found = calibration.calibrate(encoder, sets, seed=config.seed, batch_size=config.batch_size) if sets else None
    except ValueError as exc:
        found = None
        logger.warning("no calibrated floor for min_score='auto': %s", exc)
    if found is not None:
        calibration.save(found, out)
        logger.info("calibrated floor %.4f (precision %.3f on %d held-out queries)", found.min_score, found.precision,
                    found.n_queries)


def train(config: TrainConfig, *, show_progress_bar: bool = True) -> Path:
    """Fine-tune ``config.base_model`` contrastively on ``config.train_files``; return the output directory.

    Writes ``model.safetensors``, tokenizer files, ``pie_config.json``, ``training_card.json``,
    ``calibration.json`` (the floor of ``min_score="auto"``, measured on the held-out tasks) and, from
    the default model, ``delta.safetensors``.

    Raises:
        PoolError: a train or validation file is missing or malformed.
        ModelLoadError: the base model cannot be loaded.
        ValueError: the data cannot support training (e.g. too few tasks for the validation split).
    """
    from transformers import set_seed

    started = time.perf_counter()
    set_seed(config.seed)
    # Data: per train file, hold out whole tasks, then sample triplets from the rest.
    sources = _sources(config)
    held_out = [(src.name, src.val) for src in sources if src.val is not None]
    held_out += [(Path(p).stem, load_task_set(p)) for p in config.val_files]  # groups make it cross-group
    anchors_per_step = config.batch_size * config.grad_accum
    n_anchors = sum(src.sampler.n_anchors for src in sources)
    total = config.steps or max(1, math.ceil((config.epochs or 0) * n_anchors / anchors_per_step))
    # Model, and every prompt formatted (and truncated, with one warning) up front.
    encoder = _load_encoder(config)
    texts = list(dict.fromkeys(t for src in sources for v in src.train.instructions.values() for t in v))
    prompts = dict(zip(texts, encoder.format(texts), strict=True))
    before = _validate(encoder, held_out, config.batch_size) if held_out else None
    fit = _fit(encoder, sources, prompts, held_out, config, total, show_progress_bar)
    # Outputs: the model directory, the shippable delta, the card.
    out = Path(config.output_dir)
    _save(encoder, out)
    write_calibration(PIEEncoder(out), config, out)  # as users load it: the saved weights and settings
    from_default = config.base_model in ("default", "default-base")
    delta = _save_default_delta(encoder.model, out / DELTA_FILE) if from_default else None
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

    default = config.base_model in ("default", "default-base")
    shipped = config.base_model == "default" and default_model.DELTA_FILE.is_file()
    shipped_delta = default_model.DELTA_FILE if shipped else None
    steps = len(fit.losses)
    vals = [src.val for src in sources if src.val is not None]
    return TrainingCard(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        versions={"torch": torch.__version__, "transformers": transformers_version, "numpy": np.__version__},
        base_model=config.base_model,
        base_weights_sha256=default_model.BASE_SHA256 if default else None,
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
