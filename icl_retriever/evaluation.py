"""Evaluate an instruction encoder by task, as the PIE paper does, plus the retrieval view we care about.

* ICT (intention clustering): KMeans with k = number of task labels over the test instructions, scored by
  ARI, purity and homogeneity (Li et al., NeurIPS 2024, Sec. 5).
* IIS (intention similarity): Spearman correlation between the cosine of a pair and its 0/1
  same-intention label.
* P@k (retrieval): leave-one-out nearest neighbours on the ICT set. This is what a demonstration
  retriever does; near-duplicate instructions would make it trivially easy, so a query never sees a
  sample with identical instruction text (its "twins").

IEB's ``verb|noun`` is one notion of a task among several, so two more views are measured:

* cross-group P@1, for files whose samples carry a group (SNI's source ``dataset``): the nearest
  neighbour *from another group* must share the query's label. Tasks of one dataset share wording, so
  only this says whether the model recognises a task category in text it has never seen phrased that way.
* pool P@k: leave-one-out retrieval on a demo pool (any pool format) labelled by a metadata field,
  e.g. the default pool's ``task``: the user's own taxonomy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from icl_retriever.datasets import (  # noqa: F401  (the readers evaluation has always exported)
    IEBSample,
    iter_ieb_samples,
    load_grouped,
    load_ict,
    load_iis,
    load_pool_labels,
)

if TYPE_CHECKING:
    from icl_retriever.encoder import PIEEncoder

__all__ = [
    "EvalReport",
    "IEBSample",
    "cross_group_hits",
    "cross_group_precision",
    "evaluate",
    "ict_scores",
    "iis_spearman",
    "iter_ieb_samples",
    "load_ict",
    "load_grouped",
    "load_iis",
    "load_pool_labels",
    "paired_difference",
    "retrieval_hits",
    "retrieval_precision",
    "twin_count",
]

#: KMeans restarts: 10, sklearn's classic default, rather than "auto" (one k-means++ run). On eft_test
#: (k = 145) single runs' ARI spans 0.55-0.60 across seeds; keeping the lowest-inertia of 10 costs ~2 s.
KMEANS_N_INIT = 10

#: Query rows scored per block in :func:`retrieval_precision`; 1024 x 16k float32 is 64 MiB.
_BLOCK = 1024


class EvalReport(BaseModel):
    """Scores of one encoder; a field is ``None`` when the file it needs was not given."""

    model: str
    # ICT: KMeans with k = number of labels.
    n_samples: int | None = Field(None, description="instructions in the ICT file")
    n_labels: int | None = Field(None, description="task labels in the ICT file (= k of KMeans)")
    ari: float | None = None
    purity: float | None = None
    homogeneity: float | None = None
    # IIS: Spearman between pair cosine and 0/1 label.
    iis_spearman: float | None = None
    n_pairs: int | None = None
    iis_ceiling: float | None = Field(
        None, description="highest Spearman any tie-free score can reach against these 0/1 labels: sqrt(3 p (1 - p))"
    )
    # Leave-one-out retrieval on the ICT file, identical-text neighbours excluded.
    p_at_1: float | None = None
    p_at_4: float | None = None
    n_twins_excluded: int | None = Field(None, description="samples sharing their exact text with another sample")
    # Cross-group retrieval (e.g. SNI dev by source dataset).
    cross_group_p_at_1: float | None = Field(
        None, description="nearest neighbour from another group shares the label (queries whose label has one)"
    )
    n_cross_group_queries: int | None = None
    n_groups: int | None = None
    # Leave-one-out retrieval on a demo pool by a metadata label.
    pool_p_at_1: float | None = None
    pool_p_at_4: float | None = None
    n_pool: int | None = None
    n_pool_labels: int | None = None
    files: dict[str, str] = Field(default_factory=dict, description="benchmark -> file measured")

    @property
    def primary(self) -> float | None:
        """The number to compare encoders by: P@1, i.e. how often the best demonstration has the right task."""
        return self.p_at_1

    def table(self) -> str:
        """A readable two-column table of every score that was computed."""

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        rows: list[tuple[str, str]] = [("model", self.model)]
        if self.n_samples is not None:
            rows += [
                ("ICT samples / labels", f"{self.n_samples} / {self.n_labels}"),
                ("ICT ARI", num(self.ari)),
                ("ICT purity", num(self.purity)),
                ("ICT homogeneity", num(self.homogeneity)),
                ("P@1 (leave-one-out)", num(self.p_at_1)),
                ("P@4 (leave-one-out)", num(self.p_at_4)),
                ("samples with a text twin", str(self.n_twins_excluded)),
            ]
        if self.n_pairs is not None:
            rows += [
                ("IIS pairs", str(self.n_pairs)),
                ("IIS Spearman", num(self.iis_spearman)),
                ("IIS ceiling (perfect separation)", num(self.iis_ceiling)),
            ]
        if self.n_cross_group_queries is not None:
            rows += [
                ("cross-group queries / groups", f"{self.n_cross_group_queries} / {self.n_groups}"),
                ("cross-group P@1", num(self.cross_group_p_at_1)),
            ]
        if self.n_pool is not None:
            rows += [
                ("pool demos / labels", f"{self.n_pool} / {self.n_pool_labels}"),
                ("pool P@1 (leave-one-out)", num(self.pool_p_at_1)),
                ("pool P@4 (leave-one-out)", num(self.pool_p_at_4)),
            ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.n_samples is not None or self.n_pool is not None:
            lines.append("P@k: neighbours whose instruction text is identical to the query's are excluded.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- metrics


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)


def ict_scores(X: np.ndarray, labels: Sequence[str], seed: int = 0) -> dict[str, float]:
    """KMeans (k = number of distinct labels) on the embeddings; return ``ari``, ``purity``, ``homogeneity``.

    Rows are L2-normalised first so Euclidean KMeans ranks like cosine.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, homogeneity_score
    from sklearn.metrics.cluster import contingency_matrix

    if len(labels) != len(X):
        raise ValueError(f"{len(X)} embeddings but {len(labels)} labels")
    k = len(set(labels))
    predicted = KMeans(n_clusters=k, random_state=seed, n_init=KMEANS_N_INIT).fit_predict(_normalise(X))
    table = contingency_matrix(labels, predicted)  # rows: true labels, columns: clusters
    return {
        "ari": float(adjusted_rand_score(labels, predicted)),
        "purity": float(table.max(axis=0).sum() / table.sum()),
        "homogeneity": float(homogeneity_score(labels, predicted)),
    }


def iis_spearman(X1: np.ndarray, X2: np.ndarray, labels: Sequence[int]) -> float:
    """Spearman correlation between the row-wise cosine of ``X1``/``X2`` and the 0/1 same-intention labels."""
    from scipy.stats import spearmanr

    if not len(X1) == len(X2) == len(labels):
        raise ValueError(f"lengths differ: {len(X1)}, {len(X2)}, {len(labels)}")
    cosine = (_normalise(X1) * _normalise(X2)).sum(axis=1)
    return float(spearmanr(cosine, np.asarray(labels)).statistic)


def iis_ceiling(labels: Sequence[int]) -> float:
    """The Spearman of a score that ranks every positive pair above every negative one, without ties.

    With binary labels the ranks of one side are two tied blocks, so even a perfect cosine reaches only
    sqrt(3 p (1 - p)) for a positive share p (0.848 on intention_similarity_test.json): a reported IIS
    should be read against this number, not against 1.
    """
    p = float(np.mean(np.asarray(labels, dtype=float)))
    return float(np.sqrt(3 * p * (1 - p)))


def _ids(values: Sequence[str]) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)


def twin_count(texts: Sequence[str]) -> int:
    """Samples whose (stripped) text also belongs to another sample; they are each other's excluded twins."""
    counts = Counter(t.strip() for t in texts)
    return sum(n for n in counts.values() if n > 1)


def retrieval_precision(
    X: np.ndarray, labels: Sequence[str], texts: Sequence[str], ks: Sequence[int] = (1, 4)
) -> dict[int, float]:
    """Leave-one-out P@k: mean share of a query's k nearest (cosine) neighbours that have its label.

    A query's candidates are all other samples except those with the same text after stripping
    whitespace (the encoder strips it too, so such twins embed identically and would be free hits).
    A query with fewer than k candidates counts the missing ones as misses.

    Returns:
        ``{k: P@k}`` for every k in ``ks``.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    hits = retrieval_hits(X, labels, texts, max(ks))
    return {k: float(hits[:, :k].sum(axis=1).mean() / k) for k in ks}


def retrieval_hits(X: np.ndarray, labels: Sequence[str], texts: Sequence[str], k: int = 1) -> np.ndarray:
    """Per query (row) and rank (column, up to ``k``): does the leave-one-out neighbour have its label?

    The per-query form of :func:`retrieval_precision` (same exclusions), for paired comparisons of two models.
    """
    n = len(X)
    if not n == len(labels) == len(texts):
        raise ValueError(f"lengths differ: {n} embeddings, {len(labels)} labels, {len(texts)} texts")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    k_max = min(k, n)
    Xn = _normalise(X)
    label_ids, text_ids = _ids(labels), _ids([t.strip() for t in texts])
    hits = np.zeros((n, k), dtype=bool)
    for start in range(0, n, _BLOCK):
        rows = np.arange(start, min(start + _BLOCK, n))
        scores = Xn[rows] @ Xn.T
        scores[text_ids[rows, None] == text_ids[None, :]] = -np.inf  # itself and its twins
        top = np.argpartition(-scores, k_max - 1, axis=1)[:, :k_max]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        hits[rows, :k_max] = (label_ids[top] == label_ids[rows, None]) & np.isfinite(top_scores)
    return hits


def cross_group_precision(X: np.ndarray, labels: Sequence[str], groups: Sequence[str]) -> tuple[float, int]:
    """P@1 where a query's candidates are the samples of *other* groups only.

    Counted over the queries whose label occurs in another group (for the rest no right answer exists).

    Returns:
        ``(P@1, number of queries counted)``.
    """
    hits = cross_group_hits(X, labels, groups)
    return (float(hits.mean()) if len(hits) else float("nan")), len(hits)


def cross_group_hits(X: np.ndarray, labels: Sequence[str], groups: Sequence[str]) -> np.ndarray:
    """Per counted query, in sample order: is its nearest sample of another group of its label?

    The per-query form of :func:`cross_group_precision`; empty when no label occurs in two groups.
    """
    n = len(X)
    if not n == len(labels) == len(groups):
        raise ValueError(f"lengths differ: {n} embeddings, {len(labels)} labels, {len(groups)} groups")
    label_ids, group_ids = _ids(labels), _ids(groups)
    pairs = set(zip(label_ids.tolist(), group_ids.tolist(), strict=True))
    groups_per_label = Counter(label for label, _ in pairs)
    countable = np.array([groups_per_label[label] > 1 for label in label_ids.tolist()], dtype=bool)
    rows = np.flatnonzero(countable)
    hits = np.zeros(len(rows), dtype=bool)
    Xn = _normalise(X)
    for start in range(0, len(rows), _BLOCK):
        block = rows[start : start + _BLOCK]
        scores = Xn[block] @ Xn.T
        scores[group_ids[block, None] == group_ids[None, :]] = -np.inf  # itself and its group
        hits[start : start + len(block)] = label_ids[scores.argmax(axis=1)] == label_ids[block]
    return hits


def paired_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """Mean over sets of (mean of ``b`` - mean of ``a``) on the same queries, and its standard error.

    ``a`` and ``b`` map each set's name to per-query outcomes (hits as 0/1) of two models on the same
    queries, so the difference is paired: what moves is only the queries where the two disagree. The score
    of :func:`icl_retriever.training.validate` is such a mean over sets, so this is the difference of two
    models' scores and how far it can be trusted.
    """
    if a.keys() != b.keys() or not a:
        raise ValueError(f"the same non-empty sets are needed, got {sorted(a)} and {sorted(b)}")
    means, variances = [], []
    for name in a:
        x, y = np.asarray(a[name], dtype=float), np.asarray(b[name], dtype=float)
        if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
            raise ValueError(f"set {name!r}: outcomes of shapes {x.shape} and {y.shape}; one query each is needed")
        d = y - x
        means.append(d.mean())
        variances.append(d.var(ddof=1) / len(d) if len(d) > 1 else 0.0)
    m = len(means)
    return float(np.mean(means)), float(np.sqrt(np.sum(variances)) / m)


# ------------------------------------------------------------------------------------------ evaluate


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def evaluate(
    encoder: PIEEncoder | Callable[[], PIEEncoder],
    ict_path: str | Path | None = None,
    iis_path: str | Path | None = None,
    *,
    cross_group_path: str | Path | None = None,
    pool_path: str | Path | None = None,
    label_field: str = "task",
    batch_size: int | None = None,
    show_progress_bar: bool | None = None,
) -> EvalReport:
    """Score ``encoder`` on any of: an ICT file (clustering + retrieval), an IIS file (pair similarity),
    a grouped file (cross-group P@1) and a labelled demo pool (leave-one-out P@k).

    Args:
        encoder: the encoder to score (its template, pooling and max length are used as configured), or a
            function that makes it, called once every file has been read and checked.
        ict_path: IEB-format file such as ``eft_test.json``.
        iis_path: pair file such as ``intention_similarity_test.json``.
        cross_group_path: IEB-format file whose samples carry ``dataset``, such as ``sni_dev.json``.
        pool_path: demo pool file whose demos carry ``metadata[label_field]``.
        label_field: the pool's label field.
        batch_size: prompts per forward pass (``None``: the encoder's default).
        show_progress_bar: passed to :meth:`PIEEncoder.encode`.

    Raises:
        PoolError: a file is missing or malformed.
        ValueError: no file was given.
    """
    paths = {"ict": ict_path, "iis": iis_path, "cross_group": cross_group_path, "pool": pool_path}
    if all(p is None for p in paths.values()):
        raise ValueError("give at least one of ict_path, iis_path, cross_group_path, pool_path")
    from icl_retriever.embed import check_batch_size

    check_batch_size(batch_size)
    # every file is read and checked before the model loads or anything is embedded
    ict = load_ict(ict_path) if ict_path is not None else None
    pairs = load_iis(iis_path) if iis_path is not None else None
    grouped = load_grouped(cross_group_path) if cross_group_path is not None else None
    pool = load_pool_labels(pool_path, label_field) if pool_path is not None else None
    if not hasattr(encoder, "encode"):  # a factory: the model loads now
        encoder = encoder()
    report: dict[str, Any] = {
        "model": encoder.config.model,
        "files": {name: str(p) for name, p in paths.items() if p is not None},
    }
    encode_kw: dict[str, Any] = {"batch_size": batch_size, "show_progress_bar": show_progress_bar}
    if ict is not None:
        texts, labels = ict
        X = encoder.encode(texts, **encode_kw)
        precision = retrieval_precision(X, labels, texts, ks=(1, 4))
        report |= ict_scores(X, labels) | {
            "n_samples": len(texts),
            "n_labels": len(set(labels)),
            "p_at_1": precision[1],
            "p_at_4": precision[4],
            "n_twins_excluded": twin_count(texts),
        }
    if pairs is not None:
        unique = sorted({t for first, second, _ in pairs for t in (first, second)})
        row = {text: i for i, text in enumerate(unique)}
        X = encoder.encode(unique, **encode_kw)
        X1, X2 = X[[row[p[0]] for p in pairs]], X[[row[p[1]] for p in pairs]]
        labels = [p[2] for p in pairs]
        report |= {
            "iis_spearman": _finite(iis_spearman(X1, X2, labels)),
            "n_pairs": len(pairs),
            "iis_ceiling": iis_ceiling(labels),
        }
    if grouped is not None:
        texts, labels, groups = grouped
        p_at_1, n_queries = cross_group_precision(encoder.encode(texts, **encode_kw), labels, groups)
        report |= {"cross_group_p_at_1": _finite(p_at_1), "n_cross_group_queries": n_queries,
                   "n_groups": len(set(groups))}
    if pool is not None:
        texts, labels = pool
        precision = retrieval_precision(encoder.encode(texts, **encode_kw), labels, texts, ks=(1, 4))
        report |= {"pool_p_at_1": precision[1], "pool_p_at_4": precision[4], "n_pool": len(texts),
                   "n_pool_labels": len(set(labels))}
    return EvalReport(**report)
