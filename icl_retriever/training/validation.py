"""Validation of a training run and of any encoder on its held-out tasks: the score that selects
checkpoints (:func:`validate`), its per-query hits for paired comparisons, the held-out sets, and the
calibrated floor written beside a trained model."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from icl_retriever.encoder import PIEEncoder
from icl_retriever.evaluation import cross_group_hits, ict_scores, retrieval_hits
from icl_retriever.train_config import TrainConfig
from icl_retriever.training.loss import _Source
from icl_retriever.training.sampler import TripletSampler
from icl_retriever.training.tasks import TaskSet, load_task_set, split_tasks, with_lead_views

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- validation


def _validate_set(encoder: PIEEncoder, tasks: TaskSet, batch_size: int) -> tuple[dict[str, float], np.ndarray]:
    """P@1 and ARI on held-out tasks (plus cross-group P@1 when the tasks carry groups), and the per-query
    hits of the set's primary P@1 (cross-group where there is one)."""
    texts = [t for v in tasks.instructions.values() for t in v]
    labels = [task for task, v in tasks.instructions.items() for _ in v]
    X = encoder.encode(texts, batch_size=batch_size, show_progress_bar=False)
    primary = retrieval_hits(X, labels, texts)[:, 0]
    metrics = {"p_at_1": float(primary.mean()), "ari": ict_scores(X, labels)["ari"]}
    if tasks.groups:
        groups = [tasks.groups.get(task, {}).get(t, f"?{task}") for task, v in tasks.instructions.items() for t in v]
        across = cross_group_hits(X, labels, groups)
        if len(across):
            metrics["cross_group_p_at_1"], primary = float(across.mean()), across
    return metrics, primary


def _validate_sets(
    encoder: PIEEncoder, held_out: Sequence[tuple[str, TaskSet]], batch_size: int
) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """:func:`_validate_set` of every set, in eval mode (dropout off) and back."""
    model = encoder.model  # None on ONNX Runtime, which has no training mode
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        return {name: _validate_set(encoder, tasks, batch_size) for name, tasks in held_out}
    finally:
        if model is not None:
            model.train(was_training)


def _validate(
    encoder: PIEEncoder, held_out: Sequence[tuple[str, TaskSet]], batch_size: int
) -> dict[str, float]:
    """Metrics of every validation set as ``"<name>.<metric>"``, and ``score``, the mean of their P@1s.

    A set's P@1 is its cross-group P@1 when it has one (a task recognised across datasets), else
    leave-one-out P@1. The best checkpoint has the highest score; the first set's ARI breaks ties.
    """
    return _summarise(_validate_sets(encoder, held_out, batch_size))


def _summarise(sets: Mapping[str, tuple[dict[str, float], np.ndarray]]) -> dict[str, float]:
    per_set = {name: metrics for name, (metrics, _) in sets.items()}
    out = {f"{name}.{k}": v for name, metrics in per_set.items() for k, v in metrics.items()}
    primary = [m.get("cross_group_p_at_1", m["p_at_1"]) for m in per_set.values()]
    out["score"] = float(np.mean(primary))
    out["tiebreak"] = next(iter(per_set.values()))["ari"]
    return out


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
        train_set, val_set = split_tasks(tasks, config.val_fraction, config.held_out_seed)
        train_set = with_lead_views(train_set, config.lead_sentences)
        sampler = TripletSampler(
            train_set.instructions, train_set.facets, seed=config.seed + i,
            share=config.hard_negative_facets, groups=train_set.groups, group_negatives=config.group_negatives,
        )
        stem = Path(path).stem
        name = stem if all(Path(o).stem != stem for o in config.train_files[:i]) else f"{stem}{i}"
        sources.append(_Source(name, train_set, val_set, sampler, count))
    return sources


def _held_out(sources: Sequence[_Source], config: TrainConfig) -> list[tuple[str, TaskSet]]:
    """The validation sets: each train file's held-out tasks, then the ``--val-file`` files (whose groups
    make their P@1 cross-group)."""
    held_out = [(src.name, src.val) for src in sources if src.val is not None]
    return held_out + [(Path(p).stem, load_task_set(p)) for p in config.val_files]


def validate(encoder: PIEEncoder, config: TrainConfig) -> dict[str, float]:
    """The validation ``train`` reports (and selects checkpoints on) for any encoder, on the held-out split of
    ``config``: to compare a soup or interpolation with the runs it came from on the same tasks."""
    return validation_report(encoder, config)[0]


def validation_hits(encoder: PIEEncoder, config: TrainConfig) -> dict[str, np.ndarray]:
    """Per held-out query of each validation set, whether it was a hit for :func:`validate`'s score: compare two
    models query by query (:func:`icl_retriever.evaluation.paired_difference`) rather than by their scores
    alone, whose differences between recipes are often a few queries."""
    return validation_report(encoder, config)[1]


def validation_report(encoder: PIEEncoder, config: TrainConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """:func:`validate`'s metrics and :func:`validation_hits`' per-query hits from one encoding of the sets."""
    sets = _validate_sets(encoder, _held_out(_sources(config), config), config.batch_size)
    return _summarise(sets), {name: hits for name, (_, hits) in sets.items()}


def held_out_sets(config: TrainConfig) -> list[tuple[str, list[str], list[str]]]:
    """``(file name, instructions, task labels)`` of each train file's held-out tasks, instructions only:
    tasks the model never trained on, where its calibrated floor is measured."""
    sets = []
    for path in config.train_files:
        tasks = load_task_set(path, label_field=config.label_field)
        _, val = split_tasks(tasks, config.val_fraction, config.held_out_seed)
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
