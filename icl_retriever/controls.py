"""Search controls of :meth:`Retriever.get_demos`: validation, and the algorithms as small pure functions.

Everything here works on plain numpy arrays and :class:`Demo` lists, so each control is tested on its
own; :mod:`icl_retriever.retriever` wires them into a search:

1. candidates: the ``fetch_k`` best demos by PIE similarity that pass ``filter`` and ``exclude_query``
   (filtered *during* the search: over-fetch and refill, never a truncated top-k filtered afterwards);
2. order: ``rerank="hybrid"`` (:func:`hybrid_order`), ``"task_then_topic"`` (:func:`task_then_topic_order`)
   or MMR (:func:`mmr_order`);
3. ``dedup`` (:func:`dedup_keep`) drops near-duplicates;
4. ``max_tokens`` (:func:`pack_by_tokens`) packs the best demos that fit, else the first ``k`` are taken.
"""

from __future__ import annotations

import json
import math
import os
import string
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from icl_retriever.errors import first_validation_error
from icl_retriever.records import Demo, check_text

#: Cosine above which two demos count as near-duplicates when ``dedup=True``.
DEFAULT_DEDUP_THRESHOLD = 0.95
#: ``rerank="task_then_topic"``: demos whose PIE similarity is within this of the best one count as the
#: query's task. Chosen downstream (README, "Downstream benchmark"): with 0.1, an LLM's gold-output NLL
#: was lowest on the default pool and SNI dev; larger margins trade task for topic.
DEFAULT_RERANK_MARGIN = 0.1
#: ``rerank="hybrid"``: weight of the PIE (task) cosine; the plain (content) cosine gets ``1 - weight``.
DEFAULT_HYBRID_WEIGHT = 0.5
#: Candidates examined when a control re-orders or drops results and ``fetch_k`` is not given.
DEFAULT_FETCH_K = 20
#: Re-ranking methods.
RERANKERS = ("task_then_topic", "hybrid")
#: What ``rerank="auto"`` (the default) uses over an index with topic vectors: the ranking that lowered an
#: LLM's gold-output NLL most in the downstream benchmark on data that is not a test set (README,
#: "Downstream benchmark"), with ``rerank_weight`` / ``rerank_margin`` at their defaults.
DEFAULT_RERANK = "task_then_topic"
#: Default ``demo_format``: instruction, input (when not empty) and output, one per line.
DEFAULT_DEMO_FORMAT = "{instruction}\n{input}\n{output}"

#: ``filter`` values: metadata equality / membership, or a predicate over demos.
MetadataFilter = Mapping[str, Any]
DemoPredicate = Callable[[Demo], bool]
DemoFormat = str | Callable[[Demo], str]
Rerank = Literal["task_then_topic", "hybrid"]
#: ``rerank`` values: a method, ``"auto"`` (the default ranking) or ``None`` (task order only).
RerankSetting = Literal["auto", "task_then_topic", "hybrid"] | None


# validation -------------------------------------------------------------------------------------


class SearchControls(BaseModel):
    """The keyword controls of ``get_demos`` / ``get_demos_batch``, validated together.

    Build with :meth:`parse`, which raises a plain ``ValueError`` naming the control at fault.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    k: int
    diversity: float = 0.0
    fetch_k: int | None = None
    filter: Any = None
    dedup: float | None = None
    exclude_query: bool = False
    rerank: RerankSetting = "auto"
    rerank_margin: float = DEFAULT_RERANK_MARGIN
    rerank_weight: float = DEFAULT_HYBRID_WEIGHT
    min_score: float | Literal["auto"] | None = None
    max_tokens: int | None = None
    tokenizer: Any = None
    demo_format: Any = None

    @classmethod
    def parse(cls, **controls: Any) -> SearchControls:
        """Validate controls; raises ``ValueError`` with one clear message."""
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

    @field_validator("diversity", mode="before")
    @classmethod
    def _diversity(cls, value: Any) -> float:
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"diversity must be a number from 0 (plain ranking) to 1 (most diverse), got {value!r}")
        return float(value)

    @field_validator("rerank_margin", mode="before")
    @classmethod
    def _margin(cls, value: Any) -> float:
        if not _is_number(value) or not 0.0 <= float(value) <= 2.0:
            raise ValueError(f"rerank_margin must be a cosine difference from 0 to 2, got {value!r}")
        return float(value)

    @field_validator("rerank_weight", mode="before")
    @classmethod
    def _weight(cls, value: Any) -> float:
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"rerank_weight must be the PIE weight from 0 (content only) to 1 (task only), got {value!r}")
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
        if self.tokenizer is not None and self.max_tokens is None:
            raise ValueError("tokenizer is only used with max_tokens")
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


# filter -----------------------------------------------------------------------------------------


def check_filter(spec: Any) -> None:
    """Raise ``ValueError`` unless ``spec`` is None, a callable, or a mapping of field -> value(s)."""
    if spec is None or callable(spec):
        return
    if not isinstance(spec, Mapping):
        # ValueError, not TypeError: this runs inside a pydantic validator, which only converts ValueError
        raise ValueError(f"filter must be a mapping of metadata field -> value(s) or a callable, got {type(spec).__name__}")  # noqa: TRY004
    for key, value in spec.items():
        if not isinstance(key, str):
            raise ValueError(f"filter keys must be strings, got {key!r}")  # noqa: TRY004
        if isinstance(value, (list, tuple, set, frozenset)) and not value:
            raise ValueError(f"filter {key!r}: an empty list matches nothing")


def _field(demo: Demo, key: str) -> tuple[bool, Any]:
    """(present, value) of a metadata field; ``id`` is the demo id when metadata has no ``id``."""
    if key in demo.metadata:
        return True, demo.metadata[key]
    if key == "id":
        return True, demo.id
    return False, None


def _wanted(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]


def _value_matches(have: Any, wanted: list[Any]) -> bool:
    if any(have == w for w in wanted):
        return True
    return isinstance(have, list) and any(h == w for h in have for w in wanted)


def metadata_matches(demo: Demo, spec: MetadataFilter) -> bool:
    """Whether a demo passes a metadata filter.

    Every key must match (AND). A scalar value matches by equality, a list / tuple / set by membership
    (any of them). A metadata field that holds a list matches when one of its elements does, so
    ``{"tags": "poem"}`` matches ``tags: ["poem", "short"]``. A missing field never matches. The key
    ``"id"`` is the demo id (unless metadata has its own ``id``).
    """
    for key, value in spec.items():
        present, have = _field(demo, key)
        if not present or not _value_matches(have, _wanted(value)):
            return False
    return True


def as_predicate(spec: MetadataFilter | DemoPredicate | None) -> DemoPredicate | None:
    """The filter as a function Demo -> bool (None for no filter)."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    frozen = dict(spec)
    return lambda demo: metadata_matches(demo, frozen)


def _hashable(value: Any) -> Hashable:
    """A key equal for equal values (Python ==) where possible; JSON text for unhashable ones."""
    try:
        hash(value)
        return ("v", value)
    except TypeError:
        return ("json", json.dumps(value, sort_keys=True, default=str))


class MetadataIndex:
    """Lazily built postings (field value -> demo rows), so a metadata filter costs O(matches), not O(pool).

    One lives with each version of a retriever's demos; it is not updated in place.
    """

    def __init__(self, demos: Sequence[Demo]) -> None:
        self._demos = demos
        self._postings: dict[str, dict[Hashable, list[int]]] = {}

    def _field_postings(self, key: str) -> dict[Hashable, list[int]]:
        postings = self._postings.get(key)
        if postings is None:
            postings = {}
            for row, demo in enumerate(self._demos):
                present, have = _field(demo, key)
                if not present:
                    continue
                keys = {_hashable(have)}
                if isinstance(have, list):
                    keys.update(_hashable(h) for h in have)
                for value_key in keys:
                    postings.setdefault(value_key, []).append(row)
            self._postings[key] = postings
        return postings

    def rows(self, spec: MetadataFilter) -> np.ndarray:
        """Sorted rows of the demos matching ``spec`` (see :func:`metadata_matches`)."""
        result: np.ndarray | None = None
        for key, value in spec.items():
            postings = self._field_postings(key)
            hits: set[int] = set()
            for wanted in _wanted(value):
                hits.update(postings.get(_hashable(wanted), ()))
            rows = np.fromiter(hits, dtype=np.int64, count=len(hits))
            result = rows if result is None else np.intersect1d(result, rows, assume_unique=True)
            if not len(result):
                break
        if result is None:  # empty filter: everything
            return np.arange(len(self._demos), dtype=np.int64)
        return np.sort(result)


# exclude_query ----------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.split())


def is_query_itself(demo: Demo, query: str) -> bool:
    """Whether a demo's instruction (alone, or followed by its input) is the query, whitespace aside."""
    q = _norm(query)
    if _norm(demo.instruction) == q:
        return True
    return bool(demo.input) and _norm(f"{demo.instruction} {demo.input}") == q


# ordering ---------------------------------------------------------------------------------------


def mmr_order(query: np.ndarray, candidates: np.ndarray, diversity: float, limit: int | None = None) -> list[int]:
    """Maximal marginal relevance order of candidate rows (as LangChain's MMR selector).

    Each step picks the candidate maximising ``(1 - diversity) * sim(query, c) - diversity * max sim(c,
    chosen)``; ``diversity=0`` is the plain similarity order, 1 only avoids redundancy. Vectors are
    L2-normalised rows, so similarity is the inner product.

    Returns:
        Indices into ``candidates``, in pick order (``limit`` of them, default all).
    """
    n = len(candidates)
    limit = n if limit is None else min(limit, n)
    if n == 0 or limit <= 0:
        return []
    relevance = candidates @ query
    if diversity <= 0.0:
        return [int(i) for i in np.argsort(-relevance, kind="stable")[:limit]]
    lam = 1.0 - diversity
    pairwise = candidates @ candidates.T
    chosen = [int(np.argmax(relevance))]
    redundancy = pairwise[chosen[0]].copy()
    available = np.ones(n, dtype=bool)
    available[chosen[0]] = False
    while len(chosen) < limit:
        score = lam * relevance - diversity * redundancy
        score[~available] = -np.inf
        pick = int(np.argmax(score))
        chosen.append(pick)
        available[pick] = False
        np.maximum(redundancy, pairwise[pick], out=redundancy)
    return chosen


def task_then_topic_order(task_scores: np.ndarray, topic_scores: np.ndarray, margin: float) -> list[int]:
    """Order candidates: those within ``margin`` of the best task score, by topic score; then the rest.

    Args:
        task_scores: PIE cosine of each candidate to the query (the task match).
        topic_scores: plain-embedding cosine of each candidate's instruction + input to the query.
        margin: a candidate with ``task_score >= max - margin`` counts as the query's task.

    Returns:
        Indices into the candidates: the same-task group by topic score (ties by task score), then the
        others by task score.
    """
    n = len(task_scores)
    if n == 0:
        return []
    task_scores = np.asarray(task_scores, dtype=np.float64)
    topic_scores = np.asarray(topic_scores, dtype=np.float64)
    same = task_scores >= task_scores.max() - margin
    group = np.flatnonzero(same)
    rest = np.flatnonzero(~same)
    group = group[np.lexsort((-task_scores[group], -topic_scores[group]))]
    rest = rest[np.argsort(-task_scores[rest], kind="stable")]
    return [int(i) for i in np.concatenate([group, rest])]


def hybrid_order(task_scores: np.ndarray, topic_scores: np.ndarray, weight: float) -> list[int]:
    """Order candidates by ``weight * task + (1 - weight) * topic`` cosine, best first (ties: task score)."""
    task_scores = np.asarray(task_scores, dtype=np.float64)
    mixed = weight * task_scores + (1.0 - weight) * np.asarray(topic_scores, dtype=np.float64)
    return [int(i) for i in np.lexsort((-task_scores, -mixed))]


def rerank_order(
    rerank: Rerank,
    task_scores: np.ndarray,
    topic_scores: np.ndarray,
    *,
    weight: float = DEFAULT_HYBRID_WEIGHT,
    margin: float = DEFAULT_RERANK_MARGIN,
) -> list[int]:
    """Order candidates by a re-ranking method (:func:`hybrid_order` or :func:`task_then_topic_order`)."""
    if rerank == "hybrid":
        return hybrid_order(task_scores, topic_scores, weight)
    return task_then_topic_order(task_scores, topic_scores, margin)


def dedup_keep(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows to keep, in order, dropping any row whose cosine to an earlier kept row exceeds ``threshold``.

    Rows are L2-normalised; an exact duplicate (cosine 1) is dropped for any threshold below or at 1
    (``>=`` is used at threshold 1 so that exact duplicates still go).
    """
    kept: list[int] = []
    for i in range(len(vectors)):
        if kept:
            sims = vectors[kept] @ vectors[i]
            top = float(sims.max())
            if top > threshold or (threshold >= 1.0 and top >= 1.0 - 1e-6):
                continue
        kept.append(i)
    return kept


# max_tokens -------------------------------------------------------------------------------------


def format_demo(demo: Demo, demo_format: DemoFormat | None = None) -> str:
    """The text a demo takes in a prompt, as counted for ``max_tokens``.

    ``None`` is :data:`DEFAULT_DEMO_FORMAT` with the input line left out when the input is empty. A
    string is filled with ``str.format`` from ``id``, ``instruction``, ``input``, ``output`` and the
    metadata fields; a callable gets the :class:`Demo`.
    """
    if demo_format is None:
        return "\n".join(part for part in (demo.instruction, demo.input, demo.output) if part)
    if callable(demo_format):
        text = demo_format(demo)
        if not isinstance(text, str):
            raise TypeError(f"demo_format returned {type(text).__name__}, expected str")
        return text
    fields = {**demo.metadata, "id": demo.id, "instruction": demo.instruction, "input": demo.input, "output": demo.output}
    try:
        return demo_format.format_map(fields)
    except KeyError as exc:
        raise ValueError(f"demo_format names field {exc.args[0]!r}, which demo {demo.id!r} does not have") from None
    except (IndexError, AttributeError, ValueError, TypeError) as exc:  # a format spec that does not fit the value
        raise ValueError(f"demo_format {demo_format!r} on demo {demo.id!r}: {exc}") from None


def pack_by_tokens(lengths: Iterable[int], budget: int, k: int) -> list[int]:
    """Greedy packing in rank order: take each item that still fits, skip one that would overflow.

    Returns:
        Indices of the items taken (at most ``k``), in order; their lengths sum to at most ``budget``.
    """
    taken: list[int] = []
    used = 0
    for i, length in enumerate(lengths):
        if len(taken) >= k or used >= budget:
            break
        if used + length <= budget:
            taken.append(i)
            used += length
    return taken


TokenCounter = Callable[[list[str]], list[int]]


def token_counter(tokenizer: Any) -> TokenCounter:
    """A function counting tokens of texts, from a Hugging Face tokenizer, a tiktoken-like object with
    ``encode``, or a callable str -> int. Special tokens (CLS / SEP ...) are not counted."""
    if hasattr(tokenizer, "encode_batch"):  # the ``tokenizers`` library (the ONNX runtime's tokenizer)

        def count_fast(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)] if texts else []

        return count_fast
    transformers = sys.modules.get("transformers")  # not imported: cannot be one of its tokenizers
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):

        def count_hf(texts: list[str]) -> list[int]:
            if not texts:
                return []
            ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
            return [len(row) for row in ids]

        return count_hf
    if hasattr(tokenizer, "encode") and callable(tokenizer.encode):
        return lambda texts: [len(tokenizer.encode(t)) for t in texts]
    if callable(tokenizer):

        def count_callable(texts: list[str]) -> list[int]:
            counts = [tokenizer(t) for t in texts]
            for c in counts:
                if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0:
                    raise TypeError(f"tokenizer callable must return a token count (int >= 0), got {c!r}")
            return [int(c) for c in counts]

        return count_callable
    raise ValueError(
        "tokenizer must be a Hugging Face tokenizer, a model name or directory, an object with encode(), "
        f"or a callable str -> int; got {type(tokenizer).__name__}"
    )


_TOKENIZERS: dict[str, Any] = {}


def resolve_tokenizer(tokenizer: Any, default: Any) -> TokenCounter:
    """The token counter for ``max_tokens``: ``None`` uses ``default`` (the encoder's tokenizer); a string
    or path is loaded with ``AutoTokenizer.from_pretrained`` (once per process)."""
    if tokenizer is None:
        tokenizer = default
    elif isinstance(tokenizer, (str, os.PathLike)):
        name = str(tokenizer)
        if name not in _TOKENIZERS:
            from transformers import AutoTokenizer

            try:
                _TOKENIZERS[name] = AutoTokenizer.from_pretrained(name)
            except Exception as exc:  # OSError, ValueError, hub errors
                raise ValueError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        tokenizer = _TOKENIZERS[name]
    return token_counter(tokenizer)


def topic_text(demo: Demo) -> str:
    """What a topic vector embeds: the instruction, then the input on the next line when there is one."""
    return f"{demo.instruction}\n{demo.input}" if demo.input else demo.instruction
