"""Shared pieces of the benchmark scripts: data, synthetic pools, timing and tables.

Run the scripts from the repository root (``python -m benchmarks.latency ...``). They print tables;
they are not tests and assert nothing.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = ROOT / "examples" / "demos.jsonl"
EFT_TEST = ROOT.parent / "shared" / "data" / "ieb" / "eft_test.json"

#: Noise added to the real instruction embeddings to synthesise large pools (norm of the noise vector).
SIGMA = 0.3


def machine() -> str:
    import faiss
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
    )


def default_pool() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DEFAULT_POOL.read_text(encoding="utf-8").splitlines() if line.strip()]


def query_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real instructions that are not in the default pool (eft_test when present)."""
    pool = {d["instruction"] for d in default_pool()}
    if EFT_TEST.is_file():
        data = json.loads(EFT_TEST.read_text(encoding="utf-8"))
        texts = sorted({s["instruction"] for g in data.values() for s in g["samples"]} - pool)
    else:  # fall back to the pool's instructions with a twist
        texts = sorted(f"{t} Keep it brief." for t in pool)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in picked]


def synthetic_records(n: int) -> list[dict[str, Any]]:
    """``n`` demos: the default pool's demos repeated, each copy with its own id and a varied input."""
    base = default_pool()
    out = []
    for i in range(n):
        d = base[i % len(base)]
        copy = i // len(base)
        out.append(
            {
                "id": f"{d['id']}~{copy}",
                "instruction": d["instruction"],
                "input": f"{d.get('input', '')} [variant {copy}]".strip(),
                "output": d.get("output", ""),
                "metadata": d.get("metadata", {}),
            }
        )
    return out


def synthetic_vectors(base: np.ndarray, n: int, *, sigma: float = SIGMA, seed: int = 0, block: int = 100_000) -> np.ndarray:
    """Row i: ``base[i % len(base)]`` plus Gaussian noise of norm about ``sigma``, renormalised.

    This stands in for re-encoding ``n`` instructions: the vectors keep the real embeddings' task
    structure (one cluster per distinct instruction), and the noise keeps them distinct.
    """
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = base[np.arange(start, stop) % len(base)]
        noisy = rows + rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(sigma / np.sqrt(dim))
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def percentiles(samples_s: Sequence[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    ms = sorted(1000.0 * s for s in samples_s)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return statistics.median(ms), p95


def time_each(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - start)
    return out


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_size(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise ValueError(f"not a positive whole number: {text}")
    return int(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as text, pasteable into the README)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def langchain_selector(embeddings: Any, vectors: np.ndarray, records: list[dict[str, Any]], k: int) -> Any:
    """LangChain's ``SemanticSimilarityExampleSelector`` over a langchain-community FAISS store (flat inner
    product, as ``FAISS.from_texts`` builds for it) that holds ``vectors`` for ``records``; queries are
    embedded by ``embeddings`` (a LangChain ``Embeddings``). Needs ``pip install -e ".[bench]"``."""
    import faiss
    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_core.documents import Document
    from langchain_core.example_selectors import SemanticSimilarityExampleSelector

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    docs = {
        str(i): Document(page_content=r["instruction"], metadata={k_: v for k_, v in r.items() if k_ != "metadata"})
        for i, r in enumerate(records)
    }
    store = FAISS(
        embedding_function=embeddings, index=index, docstore=InMemoryDocstore(docs),
        index_to_docstore_id={i: str(i) for i in range(len(records))}, distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
    )
    return SemanticSimilarityExampleSelector(vectorstore=store, k=k, input_keys=["instruction"])
