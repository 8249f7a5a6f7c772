"""The methods that pick k demos for a query (zero-shot, random, topic, pie, reranked, MMR, the default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from icl_retriever.search.controls import DEFAULT_FETCH_K, DEFAULT_RERANK
from icl_retriever.search.ranking import DEFAULT_RERANK_MARGIN, mmr_order, rerank_order



METHOD_KINDS = ("zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid", "mmr", "default")
#: Methods run when none are named.
DEFAULT_METHODS = (
    "zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid:0.25", "hybrid:0.5", "hybrid:0.75", "mmr:0.3",
    "default",
)


class Method(BaseModel):
    """A demo-selection method and its parameter (hybrid weight, MMR diversity, rerank margin)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid", "mmr", "default"]
    param: float | None = None

    @property
    def label(self) -> str:
        """The name it is reported under, e.g. ``hybrid:0.5``."""
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def needs_pie(self) -> bool:
        return self.kind in ("pie", "pie_then_topic", "hybrid", "mmr", "default")

    @property
    def needs_topic(self) -> bool:
        """The ``topic`` baseline: the base model's contextual embedding of instruction + input."""
        return self.kind == "topic"

    @property
    def needs_content(self) -> bool:
        """The rerankers: the retriever's own topic vectors (what ``get_demos`` reranks with)."""
        return self.kind in ("pie_then_topic", "hybrid", "default")


def parse_method(text: str) -> Method:
    """Parse ``zero-shot``, ``random``, ``topic``, ``pie``, ``pie_then_topic[:MARGIN]``, ``hybrid:W``,
    ``mmr:D`` (W, D in [0, 1]: the PIE weight, the MMR diversity) or ``default`` (what
    ``Retriever.get_demos`` does with its default controls).

    Raises:
        ValueError: an unknown method or a missing / out-of-range parameter.
    """
    kind, _, raw = text.strip().partition(":")
    if kind not in METHOD_KINDS:
        raise ValueError(f"unknown method {text!r}; expected one of {', '.join(METHOD_KINDS)} (hybrid:W, mmr:D)")
    if not raw:
        if kind in ("hybrid", "mmr"):
            raise ValueError(f"method {kind!r} needs a parameter in [0, 1], e.g. {kind}:0.5")
        margin = DEFAULT_RERANK_MARGIN if kind == "pie_then_topic" else None
        return Method(kind=kind, param=margin)  # type: ignore[arg-type]
    if kind in ("zero-shot", "random", "topic", "pie", "default"):
        raise ValueError(f"method {kind!r} takes no parameter, got {text!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"method {text!r}: parameter {raw!r} is not a number") from None
    upper = 2.0 if kind == "pie_then_topic" else 1.0
    if not 0.0 <= value <= upper:
        raise ValueError(f"method {text!r}: parameter must be in [0, {upper:g}]")
    return Method(kind=kind, param=value)  # type: ignore[arg-type]


@dataclass
class _Space:
    """PIE, topic-baseline and reranking (content) vectors of the pool and of the queries, each computed
    once (``None`` if unused)."""

    pool_pie: np.ndarray | None
    pool_topic: np.ndarray | None
    query_pie: np.ndarray | None
    query_topic: np.ndarray | None
    pool_content: np.ndarray | None = None
    query_content: np.ndarray | None = None


def rank_demos(
    method: Method,
    candidates: np.ndarray,
    limit: int,
    *,
    pie_scores: np.ndarray | None = None,
    topic_scores: np.ndarray | None = None,
    content_scores: np.ndarray | None = None,
    pie_vectors: np.ndarray | None = None,
    query_pie: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The ``limit`` best candidates for a method, best first (rows of ``candidates``' values).

    Args:
        method: the method.
        candidates: pool rows the query may use (itself and its twins already removed).
        limit: how many to return (fewer if there are fewer candidates).
        pie_scores / topic_scores / content_scores: cosine of each candidate to the query, aligned with
            ``candidates`` (PIE; the ``topic`` baseline's contextual embedding; the rerankers' topic vectors).
        pie_vectors / query_pie: PIE vectors of the candidates and the query (for MMR).
        rng: source of the ``random`` order.
    """
    if method.kind == "zero-shot" or limit <= 0 or len(candidates) == 0:
        return []
    if method.kind == "random":
        if rng is None:
            raise ValueError("method 'random' needs an rng")
        return [int(r) for r in rng.permutation(candidates)[:limit]]
    if method.kind == "topic":
        order = np.argsort(-_need(topic_scores, "topic"), kind="stable")
    elif method.kind == "pie":
        order = np.argsort(-_need(pie_scores, "pie"), kind="stable")
    elif method.kind in ("hybrid", "pie_then_topic"):
        param = float(method.param or 0.0)
        rerank = "hybrid" if method.kind == "hybrid" else "task_then_topic"
        order = np.asarray(
            rerank_order(rerank, _need(pie_scores, "pie"), _need(content_scores, "content"), weight=param, margin=param)
        )
    elif method.kind == "default":  # as Retriever.get_demos: rerank="auto" over the fetch_k best PIE candidates
        top = np.argsort(-_need(pie_scores, "pie"), kind="stable")[: max(DEFAULT_FETCH_K, 4 * limit)]
        order = top[rerank_order(DEFAULT_RERANK, _need(pie_scores, "pie")[top], _need(content_scores, "content")[top])]
    else:  # mmr over the fetch_k best PIE candidates, as Retriever.get_demos(diversity=D) does
        top = np.argsort(-_need(pie_scores, "pie"), kind="stable")[: max(DEFAULT_FETCH_K, limit)]
        picked = mmr_order(_need(query_pie, "pie"), _need(pie_vectors, "pie")[top], float(method.param or 0.0), limit)
        order = top[picked]
    return [int(r) for r in candidates[order[:limit]]]


def _need(array: np.ndarray | None, name: str) -> np.ndarray:
    if array is None:
        raise ValueError(f"this method needs {name} vectors")
    return array
