"""The calibrated floor behind ``min_score="auto"``: a cosine above which a demo shares the query's task.

A raw cosine threshold means nothing to a user (what is 0.6 for this model?), so the floor is measured
once per model, on tasks the model did not train on, and stored beside the weights in
``calibration.json``. The measurement imitates what the floor is for: for half the queries (drawn with a
seed) every demo of the query's task is removed from the pool, so the best the pool offers is of another
task and the right answer is "no demo"; for the other half only the query itself (and demos with its
exact text) is removed. The floor is the lowest top-1 cosine at which the kept top-1 demos still share
the query's task with the target precision (0.9).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icl_retriever import presets
from icl_retriever.errors import ModelLoadError


class CalibratedEncoder(Protocol):
    """What :func:`calibrate` needs of an encoder (a :class:`~icl_retriever.PIEEncoder` is one). A protocol, so
    this module does not import the encoder, which imports it for ``min_score="auto"``."""

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: list[str], *, batch_size: int, show_progress_bar: bool) -> np.ndarray: ...


#: The file beside a model's weights that holds its floor.
CALIBRATION_FILE = "calibration.json"
#: Precision a kept top-1 demo must reach at the calibrated floor.
DEFAULT_PRECISION = 0.9


class FloorCalibration(BaseModel):
    """A model's calibrated floor and how it was measured (``calibration.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_score: float = Field(ge=-1.0, le=1.0, description="keep a demo whose PIE cosine is at least this")
    target_precision: float = Field(gt=0.0, le=1.0)
    precision: float = Field(ge=0.0, le=1.0, description="measured precision of kept top-1 demos at the floor")
    fingerprint: str = Field(description="the encoder (weights and settings) the floor holds for")
    n_queries: int = Field(ge=1)
    absent_share: float = Field(ge=0.0, le=1.0, description="share of queries whose task was removed")
    files: list[str] = Field(description="the labelled files whose held-out tasks were used")
    created: str


class FloorOutcomes(BaseModel):
    """Top-1 cosine of each query, whether that demo has the query's task, whether the task was removed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    scores: np.ndarray
    correct: np.ndarray
    absent: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[FloorOutcomes]) -> FloorOutcomes:
        return cls(
            scores=np.concatenate([p.scores for p in parts]),
            correct=np.concatenate([p.correct for p in parts]),
            absent=np.concatenate([p.absent for p in parts]),
        )

    def rates(self, floor: float | None) -> dict[str, float]:
        """What a floor does: ``empty_when_absent`` (nothing returned when the task is not in the pool),
        ``kept_when_present`` (a same-task top-1 kept when it is), ``precision`` of the kept top-1."""
        kept = np.ones_like(self.correct) if floor is None else self.scores >= floor
        present = ~self.absent
        return {
            "empty_when_absent": float((~kept[self.absent]).mean()) if self.absent.any() else float("nan"),
            "kept_when_present": float((kept & self.correct)[present].mean()) if present.any() else float("nan"),
            "precision": float(self.correct[kept].mean()) if kept.any() else float("nan"),
        }


def floor_outcomes(
    vectors: np.ndarray, labels: Sequence[str], texts: Sequence[str], *, absent_share: float = 0.5, seed: int = 0
) -> FloorOutcomes:
    """Leave-out top-1 retrieval over one labelled set, with the query's task removed for ``absent_share``
    of the queries (drawn with ``seed``). Rows must be unit vectors; a query never sees its own text."""
    labels_arr = np.asarray(labels, dtype=object)
    keys = np.asarray([t.strip() for t in texts], dtype=object)
    n = len(labels_arr)
    if n < 2 or len(set(labels)) < 2:
        raise ValueError("a floor needs at least two labelled texts of two different tasks")
    absent = np.zeros(n, dtype=bool)
    absent[np.random.default_rng(seed).permutation(n)[: round(n * absent_share)]] = True
    scores = np.empty(n, dtype=np.float64)
    correct = np.zeros(n, dtype=bool)
    for start in range(0, n, 1024):  # a block of queries at a time keeps the similarity matrix small
        sims = vectors[start : start + 1024] @ vectors.T
        for j, row in enumerate(sims, start=start):
            hidden = (labels_arr == labels_arr[j]) if absent[j] else (keys == keys[j])
            row = np.where(hidden, -np.inf, row)
            best = int(np.argmax(row))
            if not np.isfinite(row[best]):  # nothing left to retrieve
                scores[j], correct[j] = -np.inf, False
                continue
            scores[j], correct[j] = float(row[best]), bool(labels_arr[best] == labels_arr[j])
    return FloorOutcomes(scores=scores, correct=correct, absent=absent)


def choose_floor(outcomes: FloorOutcomes, precision: float = DEFAULT_PRECISION) -> tuple[float, float]:
    """The lowest top-1 cosine at which the kept demos (cosine at or above it) reach ``precision``;
    returns ``(floor, measured precision)``.

    Raises:
        ValueError: no threshold reaches the precision (the model cannot tell tasks apart well enough).
    """
    order = np.argsort(-outcomes.scores, kind="stable")
    scores, correct = outcomes.scores[order], outcomes.correct[order]
    finite = np.isfinite(scores)
    scores, correct = scores[finite], correct[finite]
    cumulative = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # only cut between different scores: a floor keeps every demo of equal cosine
    last_of_score = np.r_[scores[1:] != scores[:-1], True]
    ok = np.flatnonzero((cumulative >= precision) & last_of_score)
    if not len(ok):
        raise ValueError(f"no cosine floor reaches precision {precision:g} on these tasks")
    j = int(ok[-1])
    return float(scores[j]), float(cumulative[j])


def calibrate(
    encoder: CalibratedEncoder,
    sets: Sequence[tuple[str, Sequence[str], Sequence[str]]],
    *,
    precision: float = DEFAULT_PRECISION,
    absent_share: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
) -> FloorCalibration:
    """Measure ``encoder``'s floor on labelled sets ``(name, texts, labels)`` of tasks it did not train on."""
    parts = []
    for _, texts, labels in sets:
        vectors = encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=False)
        parts.append(floor_outcomes(vectors, labels, texts, absent_share=absent_share, seed=seed))
    outcomes = FloorOutcomes.concat(parts)
    floor, measured = choose_floor(outcomes, precision)
    return FloorCalibration(
        min_score=round(floor, 6),
        target_precision=precision,
        precision=round(measured, 4),
        fingerprint=encoder.fingerprint,
        n_queries=len(outcomes.scores),
        absent_share=absent_share,
        files=[name for name, _, _ in sets],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def save(calibration: FloorCalibration, model_dir: str | Path) -> Path:
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(calibration.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load(model_dir: str | Path) -> FloorCalibration | None:
    """The calibration in ``model_dir``, or None if it has none.

    Raises:
        ModelLoadError: the file exists but is not a valid calibration.
    """
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return FloorCalibration.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid floor calibration ({str(exc).splitlines()[0]})") from None


@functools.cache
def _stored(path: Path, size: int, mtime_ns: int) -> FloorCalibration | None:
    """A calibration file, read once per version of it (size and mtime)."""
    return load(path.parent)


def floor_for(model: str, fingerprint: str) -> float:
    """The floor of ``min_score="auto"`` for encoder ``fingerprint`` of ``model``: the calibration stored
    beside its weights (read once per process), if it was measured with these weights and settings.

    Raises:
        ValueError: the model carries no calibration, or one made for other weights or settings.
    """
    preset = presets.find(model)
    directory = preset.directory if preset is not None else Path(model) if Path(model).is_dir() else None
    path = None if directory is None else (directory / CALIBRATION_FILE).resolve()
    info = path.stat() if path is not None and path.is_file() else None
    found = _stored(path, info.st_size, info.st_mtime_ns) if path is not None and info is not None else None
    if found is None:
        raise ValueError(
            f"min_score='auto': model {model!r} carries no calibrated floor ({CALIBRATION_FILE}); "
            "pass a cosine, or calibrate it (icl-retriever train writes one for the models it trains)"
        )
    if found.fingerprint != fingerprint:
        raise ValueError(
            f"min_score='auto': the floor of model {model!r} was measured with other weights or settings "
            f"({found.fingerprint}, this encoder is {fingerprint}: template, pooling, max_length or "
            "quantize differ); pass a cosine instead"
        )
    return found.min_score
