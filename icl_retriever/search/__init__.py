"""Searching a retriever's data: the controls (defined once), candidates that pass the filters, their
ordering, and the token budget; all over one snapshot of the data."""

from icl_retriever.search.candidates import EXACT_FILTER_MAX, exact, find_candidates, overfetch
from icl_retriever.search.controls import DEFAULT_FETCH_K, DEFAULT_RERANK, RerankSetting, SearchControls, SearchKwargs
from icl_retriever.search.select import select, select_batch
from icl_retriever.search.snapshot import Snapshot

__all__ = [
    "DEFAULT_FETCH_K",
    "DEFAULT_RERANK",
    "EXACT_FILTER_MAX",
    "RerankSetting",
    "SearchControls",
    "SearchKwargs",
    "Snapshot",
    "exact",
    "find_candidates",
    "overfetch",
    "select",
    "select_batch",
]
