"""Metadata filters (equality / membership postings per field, or a predicate over demos), and
recognising a query among the demos (``exclude_query``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from icl_retriever.records import Demo

#: ``filter`` values: metadata equality / membership, or a predicate over demos.
MetadataFilter = Mapping[str, Any]
DemoPredicate = Callable[[Demo], bool]


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


def query_matcher(query: str) -> Callable[[Demo], bool]:
    """:func:`is_query_itself` for one query and many demos: the query is normalised once, and a demo too
    short to be it is not normalised at all (a 5 MB query costs one pass, not one per candidate)."""
    q = _norm(query)

    def matches(demo: Demo) -> bool:
        if len(demo.instruction) + len(demo.input) + 1 < len(q):
            return False
        if _norm(demo.instruction) == q:
            return True
        return bool(demo.input) and _norm(f"{demo.instruction} {demo.input}") == q

    return matches


def is_query_itself(demo: Demo, query: str) -> bool:
    """Whether a demo's instruction (alone, or followed by its input) is the query, whitespace aside."""
    return query_matcher(query)(demo)
