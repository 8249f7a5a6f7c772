"""Contrastive PIE fine-tuning: pull instructions of one task together, push related tasks apart.

Each anchor instruction gets a positive (another instruction of its task) and a hard negative (an
instruction of a *different* task sharing its verb or noun, e.g. ``write|poem`` vs ``write|story``),
and the InfoNCE loss ranks the positive above every other positive and negative in the batch. Columns
that share the anchor's task are masked out, since they are not negatives at all. The output directory
loads with ``PIEEncoder(output_dir)``; from a packaged preset it also holds a float16
``delta.safetensors`` that can be shipped as the new default.

Dropout is off by default: with real positives it is no longer needed as augmentation (SimCSE's use), and
on held-out tasks it measured worse (see :class:`TrainConfig`). Validation never touches test files: it
holds out whole tasks of the train file.
"""

from __future__ import annotations

from icl_retriever.train_config import TrainConfig
from icl_retriever.training.loop import CARD_FILE, DELTA_FILE, TrainingCard, train
from icl_retriever.training.loss import info_nce, triplet_loss
from icl_retriever.training.sampler import Triplet, TripletSampler
from icl_retriever.training.tasks import TaskSet, load_task_set, load_tasks, parse_facets, split_tasks
from icl_retriever.training.validation import (
    held_out_sets,
    validate,
    validation_hits,
    validation_report,
    write_calibration,
)

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
    "validate",
    "validation_hits",
    "validation_report",
    "write_calibration",
    "held_out_sets",
    "CARD_FILE",
    "DELTA_FILE",
]
