"""The search controls of :meth:`Retriever.get_demos`, defined once: :class:`SearchControls` validates
them together. The retriever, the CLI and the LangChain / DSPy components take their list from it.

A search: (1) candidates, the ``fetch_k`` best demos by PIE similarity that pass ``filter`` and
``exclude_query`` (:mod:`~icl_retriever.search.candidates`); (2) order, ``rerank`` or MMR
(:mod:`~icl_retriever.search.ranking`); (3) ``dedup``; (4) ``max_tokens`` packs the best demos that fit
(:mod:`~icl_retriever.search.budget`), else the first ``k`` are taken.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icl_retriever.errors import first_validation_error
from icl_retriever.records import check_text
from icl_retriever.search.budget import DemoFormat
from icl_retriever.search.filters import DemoPredicate, MetadataFilter, check_filter
from icl_retriever.search.ranking import DEFAULT_DEDUP_THRESHOLD, DEFAULT_HYBRID_WEIGHT, DEFAULT_RERANK_MARGIN, RERANKERS

#: Candidates examined when a control re-orders or drops results and ``fetch_k`` is not given.
DEFAULT_FETCH_K = 20
#: What ``rerank="auto"`` (the default) uses over an index with topic vectors: the ranking that lowered an
#: LLM's gold-output NLL most in the downstream benchmark on data that is not a test set
#: (docs/benchmarks.md, "Choosing the default ranking"), with ``rerank_weight`` / ``rerank_margin`` at their
#: defaults.
DEFAULT_RERANK = "task_then_topic"

#: ``rerank`` values: a method, ``"auto"`` (the default ranking) or ``None`` (task order only).
RerankSetting = Literal["auto", "task_then_topic", "hybrid"] | None


# validation -------------------------------------------------------------------------------------


class SearchKwargs(TypedDict, total=False):
    """The keyword controls of ``get_demos`` / ``get_demos_batch`` as typed keywords (``**controls:
    Unpack[SearchKwargs]``); the fields and their meaning are :class:`SearchControls`' (a test keeps the
    two lists equal)."""

    diversity: float
    fetch_k: int | None
    filter: MetadataFilter | DemoPredicate | None
    dedup: bool | float | None
    exclude_query: bool
    rerank: RerankSetting
    rerank_margin: float
    rerank_weight: float
    min_score: float | Literal["auto"] | None
    max_tokens: int | None
    tokenizer: Any
    demo_format: DemoFormat | None


#: Number controls with a closed range: (lowest, highest, what the value means, for the error message).
_RANGES = {
    "diversity": (0.0, 1.0, "a number from 0 (plain ranking) to 1 (most diverse)"),
    "rerank_margin": (0.0, 2.0, "a cosine difference from 0 to 2"),
    "rerank_weight": (0.0, 1.0, "the PIE weight from 0 (content only) to 1 (task only)"),
}


class SearchControls(BaseModel):
    """The keyword controls of ``get_demos`` / ``get_demos_batch``, each defined and documented here once
    and validated together. Build with :meth:`parse`, which raises a plain ``ValueError`` naming the control
    at fault. A search: candidates (the ``fetch_k`` best by task similarity that pass ``filter`` and
    ``exclude_query``), then ``min_score``, the order (``rerank`` or ``diversity``), ``dedup``, and ``k``
    or the ``max_tokens`` budget."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    k: int = Field(description="how many demos; more than the pool holds returns the whole pool")
    diversity: float = Field(
        0.0,
        description="0 ranks by similarity alone; above 0, maximal marginal relevance over the fetch_k best "
        "candidates trades similarity for variety (1: variety only), as LangChain's MMR with lambda_mult = "
        "1 - diversity",
    )
    fetch_k: int | None = Field(
        None, description="candidates examined by diversity, rerank, dedup and max_tokens (default max(20, 4 k)); "
        "at least k",
    )
    filter: Any = Field(
        None,
        description='only demos whose metadata match: {"task": "translation"} (equality), {"lang": ["en", "de"]} '
        "(any of), several keys all matching; or a callable Demo -> bool. Applied during the search: the index "
        "is searched deeper until k matches are found or the pool is exhausted",
    )
    dedup: float | None = Field(
        None,
        description="drop a demo whose cosine to a better-ranked one exceeds this (True: 0.95); compares topic "
        "vectors (instruction + input) when the index has them, else instruction embeddings",
    )
    exclude_query: bool = Field(
        False, description="drop demos whose instruction (or instruction + input) is the query itself, whitespace "
        "aside (leave-one-out evaluation)",
    )
    rerank: RerankSetting = Field(
        "auto",
        description='how the candidates are ordered. "auto": "task_then_topic" (DEFAULT_RERANK, the ranking that helped an LLM most '
        "downstream) when the index has topic vectors and diversity is 0, else task order (logged once); None: "
        'task (PIE) order; "task_then_topic": candidates within rerank_margin of the best PIE score (the '
        "query's task) ordered by the plain-embedding similarity of instruction + input to the query, the "
        'others after by PIE score; "hybrid": rerank_weight x PIE cosine + (1 - rerank_weight) x plain cosine',
    )
    rerank_margin: float = Field(DEFAULT_RERANK_MARGIN, description='PIE cosine margin of "same task" for rerank')
    rerank_weight: float = Field(DEFAULT_HYBRID_WEIGHT, description='PIE weight of rerank="hybrid"')
    min_score: float | Literal["auto"] | None = Field(
        None,
        description='drop demos whose PIE cosine is below this, so fewer than k (or none) may come back; "auto": '
        "the model's calibrated floor, where a kept demo shares the query's task with precision 0.9 on tasks it "
        "never trained on (PIEEncoder.calibrated_floor)",
    )
    max_tokens: int | None = Field(
        None,
        description="pack the best demos whose formatted length fits this budget in total, skipping one that "
        "would overflow (a later, shorter one may still fit); never truncates a demo",
    )
    tokenizer: Any = Field(
        None,
        description="counts tokens for max_tokens: default the encoder's; a Hugging Face tokenizer, a model name "
        "or directory, an object with encode (tiktoken) or a callable str -> int",
    )
    demo_format: Any = Field(
        None,
        description="the text counted per demo: default instruction, input (if any) and output on separate lines; "
        "a str.format template over instruction, input, output, id and metadata fields; or a callable Demo -> str",
    )

    @classmethod
    def parse(cls, **controls: Any) -> SearchControls:
        """Validate controls; raises ``ValueError`` with one clear message."""
        unknown = [name for name in controls if name not in cls.model_fields]
        if unknown:
            known = ", ".join(name for name in cls.model_fields if name != "k")
            raise ValueError(f"unknown search control {unknown[0]!r} (the controls: {known})")
        try:
            return cls(**controls)
        except ValidationError as exc:
            field, cause, msg = first_validation_error(exc, "controls")
            raise ValueError(str(cause) if cause is not None else f"{field}: {msg}") from None

    @field_validator("k", "fetch_k", "max_tokens", mode="before")
    @classmethod
    def _positive_int(cls, value: Any, info: Any) -> Any:
        if value is None and info.field_name != "k":
            return None
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value!r}")
        return int(value)

    @field_validator("diversity", "rerank_margin", "rerank_weight", mode="before")
    @classmethod
    def _in_range(cls, value: Any, info: Any) -> float:
        low, high, meaning = _RANGES[info.field_name]
        if not _is_number(value) or not low <= float(value) <= high:
            raise ValueError(f"{info.field_name} must be {meaning}, got {value!r}")
        return float(value)

    @field_validator("min_score", mode="before")
    @classmethod
    def _min_score(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if not _is_number(value) or not -1.0 <= float(value) <= 1.0:
            raise ValueError(f"min_score must be a cosine from -1 to 1 or 'auto' (the model's calibrated floor), got {value!r}")
        return float(value)

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup(cls, value: Any) -> float | None:
        if value is None or value is False:
            return None
        if value is True:
            return DEFAULT_DEDUP_THRESHOLD
        if not _is_number(value) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"dedup must be True or a cosine threshold in (0, 1], got {value!r}")
        return float(value)

    @field_validator("exclude_query", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"exclude_query must be True or False, got {value!r}")  # noqa: TRY004 (pydantic wants ValueError)
        return value

    @field_validator("rerank", mode="before")
    @classmethod
    def _rerank(cls, value: Any) -> Any:
        if value is not None and value != "auto" and value not in RERANKERS:
            choices = ", ".join(map(repr, ("auto", *RERANKERS)))
            raise ValueError(f"unknown rerank {value!r}; expected one of {choices} or None (task order only)")
        return value

    @field_validator("filter", mode="before")
    @classmethod
    def _filter(cls, value: Any) -> Any:
        check_filter(value)
        return value

    @field_validator("demo_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str) and not callable(value):
            raise ValueError(f"demo_format must be a format string or a callable Demo -> str, got {type(value).__name__}")
        if isinstance(value, str):
            check_text(value, "demo_format")
            try:
                names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
            except ValueError as exc:
                raise ValueError(f"demo_format {value!r}: {exc}") from None
            for name in names:
                if not name or name.isdigit() or any(c in name for c in ".["):
                    raise ValueError(
                        f"demo_format {value!r}: field {{{name}}} is not a field name; use {{instruction}}, {{input}}, "
                        "{output}, {id} or a metadata field (no positions, attributes or indexes)"
                    )
        return value

    @model_validator(mode="after")
    def _together(self) -> SearchControls:
        if self.fetch_k is not None and self.fetch_k < self.k:
            raise ValueError(f"fetch_k ({self.fetch_k}) must be at least k ({self.k})")
        if self.rerank not in (None, "auto") and self.diversity > 0:
            raise ValueError("diversity and rerank both decide the order of the demos; use one of them")
        # a control that would be ignored is an error, never silently dropped (demo_format is not: the
        # framework adapters also write each document's text with it)
        if self.tokenizer is not None and self.max_tokens is None:
            raise ValueError("tokenizer is only used with max_tokens")
        # (a default value passed along, by an adapter that forwards every control, changes nothing: allowed)
        if self.rerank_margin != DEFAULT_RERANK_MARGIN and self.rerank not in ("auto", "task_then_topic"):
            raise ValueError(f"rerank_margin is only used with rerank='task_then_topic' (or 'auto'), not {self.rerank!r}")
        if self.rerank_weight != DEFAULT_HYBRID_WEIGHT and self.rerank != "hybrid":
            raise ValueError(f"rerank_weight is only used with rerank='hybrid', not {self.rerank!r}")
        return self

    def resolve(self, *, has_topic: bool) -> SearchControls:
        """Settle ``rerank="auto"``: :data:`DEFAULT_RERANK` over an index with topic vectors, task order
        without them (the caller says so) or when ``diversity`` asks for MMR."""
        if self.rerank != "auto":
            return self
        return self.model_copy(update={"rerank": DEFAULT_RERANK if has_topic and self.diversity == 0 else None})

    @property
    def reorders(self) -> bool:
        """Whether a control looks beyond the top k (so candidates are over-fetched)."""
        return self.diversity > 0 or self.rerank is not None or self.dedup is not None or self.max_tokens is not None

    @property
    def n_candidates(self) -> int:
        """How many filtered candidates the search must produce."""
        if not self.reorders:
            return self.k
        return self.fetch_k if self.fetch_k is not None else max(DEFAULT_FETCH_K, 4 * self.k)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def check_search_kwargs(controls: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``controls`` as a dict if each is a search control (a :class:`SearchControls` field).

    ``k`` has its own field here. Checking names up front makes a typo fail at construction, not on the
    first query; values are validated by ``get_demos`` with the query.

    Raises:
        ValueError: a control is ``k`` or ``query``, or no such control exists.
    """
    known = [name for name in SearchControls.model_fields if name != "k"]
    for name in controls:
        if name in ("k", "query", "self"):
            raise ValueError(f"{name!r} is not a search control; pass it as its own argument")
        if name not in known:
            raise ValueError(f"unknown search control {name!r} (Retriever.get_demos accepts: {', '.join(map(repr, known))})")
    return dict(controls)
