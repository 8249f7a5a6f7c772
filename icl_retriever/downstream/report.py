"""The benchmark's configuration, per-query outcomes and the report (tables with paired differences)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from icl_retriever.errors import first_validation_error

from icl_retriever.downstream.methods import DEFAULT_METHODS, parse_method
from icl_retriever.downstream.scoring import ClosedLabelRule, OptionScore


class DownstreamConfig(BaseModel):
    """Settings of a run; saved in the report so a result says how it was made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4])
    max_queries: int | None = Field(100, ge=1, description="queries sampled from the query set (None: all)")
    seed: int = 0
    max_prompt_tokens: int = Field(1024, ge=16)
    batch_size: int = Field(4, ge=1)
    reference: str | None = Field(
        None, description="method the NLL differences are taken against; when not given, topic if it is run"
    )
    label_field: str = "task"
    option_score: OptionScore = "total"
    closed_rule: ClosedLabelRule = Field(default_factory=ClosedLabelRule)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        labels = [parse_method(m).label for m in value]
        if not labels:
            raise ValueError("give at least one method")
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods repeat: {labels}")
        return labels

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(f"ks must be positive integers, got {value}")
        return sorted(set(value))

    @model_validator(mode="before")
    @classmethod
    def _default_reference(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reference" not in data:
            methods = data.get("methods", DEFAULT_METHODS)
            if isinstance(methods, (list, tuple)) and "topic" in [str(m).strip() for m in methods]:
                data = {**data, "reference": "topic"}
        return data

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        label = parse_method(value).label
        methods = info.data.get("methods")
        if methods is not None and label not in methods:
            raise ValueError(f"reference method {value!r} is not among the methods {methods}")
        return label

    @classmethod
    def parse(cls, **settings: Any) -> DownstreamConfig:
        """Validate settings; raises ``ValueError`` with one line naming the setting at fault."""
        try:
            return cls(**settings)
        except ValidationError as exc:
            field, cause, msg = first_validation_error(exc, "config")
            raise ValueError(f"{field}: {cause if cause is not None else msg}") from None


class QueryOutcome(BaseModel):
    """One query under one (method, k): the demos chosen and how the LM did."""

    method: str
    k: int
    query_id: str
    label: str | None
    demo_ids: list[str] = Field(description="chosen demos, best first")
    same_task: float | None = Field(description="share of the demos with the query's label")
    nll: float = Field(description="mean negative log-likelihood per gold-output token")
    gold_tokens: int
    prompt_tokens: int
    truncated: bool
    chosen: str | None = Field(None, description="option picked by likelihood (closed-label queries)")
    correct: bool | None = None


class MethodSummary(BaseModel):
    """Metrics of one (method, k) over all queries."""

    method: str
    k: int
    n_queries: int
    nll: float = Field(description="mean over queries of the gold NLL per token")
    nll_se: float | None
    delta_nll: float | None = Field(
        None, description="mean per-query NLL difference to the reference (negative: better)"
    )
    delta_se: float | None = None
    same_task: float | None = None
    n_closed: int = Field(0, description="queries with a closed label set (scored for accuracy)")
    accuracy: float | None = None
    n_truncated: int = 0
    prompt_tokens: float = Field(description="mean prompt length in tokens")


class DownstreamReport(BaseModel):
    """A whole run: its settings, one summary per (method, k), and every per-query outcome."""

    model: str
    pool: str | None
    queries: str | None
    n_pool: int
    n_queries: int
    config: DownstreamConfig
    rows: list[MethodSummary]
    outcomes: list[QueryOutcome]
    seconds: float

    def summary(self) -> str:
        """What ``icl-retriever eval --downstream`` and the benchmark print: the run, :meth:`table`, a legend."""
        ref = self.config.reference
        return "\n".join([
            f"model {self.model}, pool {self.pool} ({self.n_pool} demos), {self.n_queries} queries",
            self.table(),
            f"NLL: mean gold-output NLL per token; Δ: paired difference to {ref} (± standard error); "
            f"accuracy: option {self.config.option_score} log-likelihood on closed-label queries (n)",
        ])

    def table(self) -> str:
        """A markdown table of :attr:`rows`."""

        def num(value: float | None, digits: int = 3, signed: bool = False) -> str:
            if value is None:
                return "-"
            return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

        ref = self.config.reference
        head = [
            "method", "k", "NLL/token", "± se", f"Δ vs {ref}" if ref else "Δ", "± se", "same-task", "accuracy (n)",
            "truncated", "prompt tokens",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in self.rows:
            acc = f"{num(r.accuracy)} ({r.n_closed})" if r.n_closed else "-"
            is_ref = r.method == ref
            cells = [
                r.method, str(r.k), num(r.nll), num(r.nll_se),
                "(ref)" if is_ref else num(r.delta_nll, signed=True), "" if is_ref else num(r.delta_se),
                num(r.same_task), acc, str(r.n_truncated), f"{r.prompt_tokens:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _se(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
