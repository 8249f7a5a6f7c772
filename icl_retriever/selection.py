"""Diverse data selection: pick N instructions that cover the space of tasks (the PIE paper's other use).

Instruction tuning gains more from many different tasks than from many examples of a few, so from a
large pool we want N instructions spread over as many tasks as possible. With task embeddings that
means spreading the picks over the embedding space:

- ``kmeans``: k-means with k = N on the (unit) vectors (``faiss.Kmeans``, spherical), then, for every
  cluster, the instruction nearest its centroid (the next nearest when that one is taken or capped);
- ``kcenter``: greedy k-center (farthest-point): start at the instruction nearest the mean, then always
  add the one farthest (lowest best cosine) from everything picked so far.

``per_task_cap`` bounds how many picks share a label, when the pool carries labels.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, Field

from icl_retriever.embed import check_batch_size
from icl_retriever.encoder import PIEEncoder, Runtime
from icl_retriever.ray_engine import RayOptions
from icl_retriever.records import Demo, load_pool

Method = Literal["kmeans", "kcenter", "random"]
METHODS: tuple[Method, ...] = ("kmeans", "kcenter", "random")


def select_diverse(
    vectors: np.ndarray,
    n: int,
    *,
    method: Method = "kmeans",
    labels: Sequence[str | None] | None = None,
    per_task_cap: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of ``n`` rows of ``vectors`` (unit rows, float32) that cover the space, in pick order.

    Args:
        method: ``"kmeans"``, ``"kcenter"`` or ``"random"`` (the baseline: a seeded uniform sample).
        labels: each row's task label, needed by ``per_task_cap`` (``None``: unlabelled row, never capped).
        per_task_cap: at most this many picks per label.
        seed: k-means initialisation and the random baseline.

    Raises:
        ValueError: ``n`` is not between 1 and the number of rows, an unknown method, a cap without
            labels, or a cap that leaves fewer than ``n`` rows to pick from.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"vectors must be a non-empty (rows, dim) array, got shape {x.shape}")
    check_selection(n, method=method, per_task_cap=per_task_cap, rows=len(x), labels=labels)
    cap = _Cap(labels, per_task_cap, len(x))
    if method == "random":
        order = np.random.default_rng(seed).permutation(len(x))
        return np.array(cap.take(order, n), dtype=np.int64)
    if method == "kcenter":
        return _kcenter(x, n, cap)
    return _kmeans(x, n, cap, seed)


def check_selection(
    n: int,
    *,
    method: str = "kmeans",
    per_task_cap: int | None = None,
    rows: int | None = None,
    labels: Sequence[str | None] | None = None,
) -> None:
    """Validate a selection's arguments: what can be checked without the pool first, the rest once its
    size (``rows``) and ``labels`` are known, so a bad argument never waits for an embedding.

    Raises:
        ValueError: ``n`` is not an integer from 1 to ``rows``, an unknown method, a bad cap, a cap
            without labels, or one that leaves fewer than ``n`` rows to pick from.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (rows is not None and n > rows):
        upto = f"from 1 to the {rows} instructions" if rows is not None else ">= 1"
        raise ValueError(f"n must be an integer {upto}, got {n!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if per_task_cap is not None and (
        not isinstance(per_task_cap, int) or isinstance(per_task_cap, bool) or per_task_cap < 1
    ):
        raise ValueError(f"per_task_cap must be an integer >= 1, got {per_task_cap!r}")
    if rows is None:
        return
    if labels is not None and len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} vectors")
    if per_task_cap is not None:
        if labels is None:
            raise ValueError("per_task_cap needs labels (a label field of the pool)")
        counts = Counter(labels)
        room = sum(c if label is None else min(c, per_task_cap) for label, c in counts.items())
        if room < n:
            raise ValueError(f"per_task_cap {per_task_cap} leaves {room} instructions to pick from, fewer than n={n}")


class _Cap:
    """Which rows may still be picked: not picked yet, and their label not at the cap."""

    def __init__(self, labels: Sequence[str | None] | None, cap: int | None, rows: int) -> None:
        self.free = np.ones(rows, dtype=bool)
        self.cap = cap
        self.labels = labels
        self.used: Counter[str] = Counter()
        self.rows_of: dict[str, list[int]] = {}
        if cap is not None and labels is not None:
            for row, label in enumerate(labels):
                if label is not None:
                    self.rows_of.setdefault(label, []).append(row)

    def allows(self, row: int) -> bool:
        return bool(self.free[row])

    def add(self, row: int) -> None:
        self.free[row] = False
        label = None if self.labels is None else self.labels[row]
        if self.cap is not None and label is not None:
            self.used[label] += 1
            if self.used[label] >= self.cap:
                self.free[self.rows_of[label]] = False

    def take(self, order: Sequence[int] | np.ndarray, n: int) -> list[int]:
        out: list[int] = []
        for row in order:
            if len(out) == n:
                break
            if self.allows(int(row)):
                self.add(int(row))
                out.append(int(row))
        return out


def _kcenter(x: np.ndarray, n: int, cap: _Cap) -> np.ndarray:
    """Greedy farthest-point picks; a row's distance is 1 - its best cosine to the picks so far."""
    mean = x.mean(axis=0)
    best = np.full(len(x), -np.inf, dtype=np.float32)  # best cosine to any pick; -inf before the first
    picks: list[int] = []
    row = int(np.argmax(x @ mean))
    for _ in range(n):
        cap.add(row)
        picks.append(row)
        best = np.maximum(best, x @ x[row])
        if len(picks) == n:
            break
        row = int(np.argmin(np.where(cap.free, best, np.inf)))
    return np.array(picks, dtype=np.int64)


def _kmeans(x: np.ndarray, n: int, cap: _Cap, seed: int) -> np.ndarray:
    """One pick per k-means cluster, nearest its centroid; clusters take turns by size (largest first) and
    a cluster whose nearest rows are taken or capped takes its next nearest."""
    km = faiss.Kmeans(x.shape[1], n, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    depth = min(len(x), 64)
    _, near = index.search(km.centroids.astype(np.float32), depth)
    sizes = np.bincount(assign, minlength=n)
    picks: list[int] = []
    for c in np.argsort(-sizes, kind="stable"):
        row = next((int(r) for r in near[c] if r >= 0 and cap.allows(int(r))), None)
        if row is None:  # every near row is taken: the nearest free row of the whole pool
            scores = x @ km.centroids[c]
            row = next((int(r) for r in np.argsort(-scores) if cap.allows(int(r))), None)
        if row is not None:
            cap.add(row)
            picks.append(row)
    return np.array(picks[:n], dtype=np.int64)


class Selection(BaseModel):
    """What :func:`select_pool` picked, and how well the picks cover the source's labels."""

    source: str
    method: str
    n: int
    demos: list[Demo]
    pool_size: int
    labels_in_pool: int | None = Field(description="distinct labels in the source (None: unlabelled)")
    labels_covered: int | None = Field(description="distinct labels among the picks")
    seconds: float


def select_pool(
    source: str | Path,
    n: int,
    *,
    method: Method = "kmeans",
    label_field: str = "task",
    per_task_cap: int | None = None,
    encoder: PIEEncoder | Callable[[], PIEEncoder] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    show_progress_bar: bool = False,
    engine: Literal["local", "ray"] = "local",
    ray: RayOptions | None = None,
    runtime: Runtime = "auto",
) -> Selection:
    """Pick ``n`` demos of a pool file or an index directory that cover the space of tasks.

    An index directory's stored vectors are used as they are (no embedding); a pool file is embedded
    with ``encoder`` (default: the embedded PIE default), here or, with ``engine="ray"``, on a Ray cluster
    (:mod:`icl_retriever.ray_engine`; ``source`` may then be a glob pattern). Labels come from each demo's
    ``label_field`` metadata (IEB files store their label as ``task``); they are only needed by
    ``per_task_cap``. Every argument is checked before a model loads or anything is embedded: ``n``
    against the pool's size once the pool is read (an index's manifest; a Ray run learns it last).

    Args:
        encoder: the encoder, or a function that makes it (called only once the arguments and the pool
            passed their checks), or ``None`` (the default model; an index directory's own).
        runtime: where the model made for ``encoder=None`` computes (:class:`PIEEncoder`; an index
            directory's model too).
        batch_size: instructions per forward pass of a pool file's local embedding (an index's vectors are
            stored; Ray batches on its actors).

    Raises:
        PoolError / IndexFormatError: the source cannot be read.
        ValueError: see :func:`check_selection`; ``engine="ray"`` or ``batch_size`` with an index
            directory, whose vectors are not embedded again.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    check_selection(n, method=method, per_task_cap=per_task_cap)
    check_batch_size(batch_size)
    if engine == "ray" and batch_size is not None:
        raise ValueError('batch_size applies to a local run; engine="ray" batches on its actors')
    started = time.perf_counter()
    path = Path(source)
    if path.is_dir():
        from icl_retriever.retriever import Retriever
        from icl_retriever.store import all_vectors, load_manifest

        if engine != "local" or batch_size is not None:  # nothing is embedded: these would be ignored
            raise ValueError(f"{source}: an index directory's stored vectors are used as they are; engine='ray' "
                             "and batch_size apply to a pool file, which is embedded")
        check_selection(n, method=method, rows=load_manifest(path).count)  # the cap: once its labels are read
        retriever = Retriever.from_index(path, encoder=_made(encoder, runtime) if encoder is not None else None,
                                         runtime=runtime)
        demos, vectors = retriever.demos, all_vectors(retriever.index)
    elif engine == "ray":
        import tempfile

        from icl_retriever import ray_engine

        with ray_engine.read_and_embed([source], _made(encoder, runtime), topic=False, options=ray or RayOptions(),
                                       staging=Path(tempfile.gettempdir()) / ".icl-retriever-select-") as embedded:
            return _select(str(source), embedded.demos, embedded.vectors, n, method, label_field, per_task_cap, seed,
                           started)
    else:
        demos = load_pool(path)
        check_selection(n, method=method, per_task_cap=per_task_cap, rows=len(demos),
                        labels=_labels(demos, label_field))
        vectors = _made(encoder, runtime).encode([d.instruction for d in demos], batch_size=batch_size,
                                        show_progress_bar=show_progress_bar)
    return _select(str(source), demos, vectors, n, method, label_field, per_task_cap, seed, started)


def _made(encoder: PIEEncoder | Callable[[], PIEEncoder] | None, runtime: Runtime) -> PIEEncoder:
    """The encoder itself, made by its factory, or the default one."""
    if encoder is None:
        return PIEEncoder(runtime=runtime)
    return encoder if isinstance(encoder, PIEEncoder) else encoder()


def _labels(demos: Sequence[Demo], label_field: str) -> list[str | None] | None:
    """Each demo's label (``None``: unlabelled), or None when no demo carries one."""
    raw = [d.metadata.get(label_field) for d in demos]
    labels = [None if v is None else str(v) for v in raw]
    return labels if any(label is not None for label in labels) else None


def _select(
    source: str, demos: Sequence[Demo], vectors: np.ndarray, n: int, method: Method, label_field: str,
    per_task_cap: int | None, seed: int, started: float,
) -> Selection:
    """Pick from embedded demos (:func:`select_diverse`) and report."""
    labels = _labels(demos, label_field)
    rows = select_diverse(vectors, n, method=method, labels=labels, per_task_cap=per_task_cap, seed=seed)
    picked = [demos[int(r)] for r in rows]
    return Selection(
        source=source, method=method, n=n, demos=picked, pool_size=len(demos),
        labels_in_pool=len({x for x in labels if x is not None}) if labels is not None else None,
        labels_covered=len({labels[int(r)] for r in rows} - {None}) if labels is not None else None,
        seconds=round(time.perf_counter() - started, 3),
    )
