"""Building an index directory from a pool: validate everything first, embed, write atomically."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from icl_retriever.encoder import PIEEncoder
from icl_retriever.index_store import check_target
from icl_retriever.records import Demo, load_pool
from icl_retriever.retriever import Retriever


def build_index(
    pool: str | Path | Iterable[Demo | Mapping[str, Any]],
    out: str | Path,
    *,
    encoder: PIEEncoder | None = None,
    batch_size: int = 32,
    force: bool = False,
    show_progress_bar: bool | None = None,
) -> Retriever:
    """Validate a pool, embed its instructions and write an index directory.

    The pool is fully validated and the target checked before any embedding work, and the index
    is written atomically, so a failure leaves any existing index at ``out`` untouched.

    Args:
        pool: a pool file (JSONL, JSON list, IEB) or an iterable of :class:`Demo` / dicts.
        out: the index directory to create.
        encoder: defaults to the embedded PIE default.
        force: replace an existing index at ``out``.

    Returns:
        A :class:`Retriever` over the new index.

    Raises:
        PoolError: the pool is empty or malformed.
        IndexExistsError: ``out`` exists and ``force`` is not set.
    """
    out = Path(out)
    check_target(out, force=force)
    demos = load_pool(pool)
    retriever = Retriever.from_demos(demos, encoder=encoder, batch_size=batch_size, show_progress_bar=show_progress_bar)
    retriever.save(out, force=force)
    return retriever
