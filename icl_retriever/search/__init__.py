"""Searching a snapshot of a retriever's data: candidates that pass the filters, then selection."""

from icl_retriever.search.candidates import EXACT_FILTER_MAX, exact, find_candidates, overfetch
from icl_retriever.search.select import select
from icl_retriever.search.snapshot import Snapshot

__all__ = ["EXACT_FILTER_MAX", "Snapshot", "exact", "find_candidates", "overfetch", "select"]
