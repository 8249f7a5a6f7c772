"""Test data and helpers shared by several test modules (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from icl_retriever import Demo, default_pool_path
from icl_retriever.encoder import EncoderConfig
from icl_retriever.store import MANIFEST_FILE, VECTORS, IndexParams

ROOT = Path(__file__).resolve().parents[1]
#: An encoder config for indexes of synthetic vectors (no model behind them).
SYNTHETIC_CFG = EncoderConfig(model="m", template="{instruction}")
#: Small parameters of every index type, for indexes of a few thousand synthetic vectors.
SMALL_INDEX_PARAMS = {
    "flat": None,
    "hnsw": IndexParams(M=8, ef_construction=40, ef_search=32),
    "ivf": IndexParams(nlist=20, nprobe=4),
    "ivfpq": IndexParams(nlist=20, nprobe=4, pq_m=8),
}

#: Ten demos of five tasks, two per task.
POOL = [
    {"id": f"d{i}", "instruction": text, "output": "ok", "task": task}
    for i, (text, task) in enumerate(
        [
            ("Write a poem about the sea.", "poem"),
            ("Compose a short poem about a busy city.", "poem"),
            ("Translate 'hello' into German.", "translate"),
            ("Translate 'thank you' into French.", "translate"),
            ("Summarize the text below in one sentence.", "summarize"),
            ("Give a one-line summary of this article.", "summarize"),
            ("Write a SQL query that lists customers from Spain.", "sql"),
            ("Write a SQL query counting orders per day.", "sql"),
            ("Tell me a joke about cats.", "joke"),
            ("Tell me a joke about programmers.", "joke"),
        ]
    )
]
QUERY = "Translate 'good night' into German."


def ids(demos: list[Demo]) -> list[str]:
    return [d.id for d in demos]


class CountingEncode:
    """Wraps ``encoder.encode``: counts the texts it embeds and can fail on the n-th call."""

    def __init__(self, encoder: Any, fail_on_call: int | None = None) -> None:
        self.original = type(encoder).encode.__get__(encoder)  # the real method, even when already patched
        self.fail_on_call = fail_on_call
        self.calls: list[list[str]] = []

    def __call__(self, texts, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return self.original(texts, **kwargs)


def resync(index_dir: Path, role: str = VECTORS) -> None:
    """Make an index's manifest vouch for one of its data files as it is now (what a forger would do)."""
    path = index_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    file = index_dir / manifest["files"][role]["name"]
    manifest["files"][role].update(size=file.stat().st_size, sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    path.write_text(json.dumps(manifest))


def docs_example(page: Path) -> str:
    """The complete example of a docs page: its one fenced block opened with ```python title="example.py"."""
    text = page.read_text(encoding="utf-8")
    blocks = text.split('```python title="example.py"\n')
    if len(blocks) != 2:
        raise AssertionError(f"{page}: expected one ```python title=\"example.py\" block, found {len(blocks) - 1}")
    return blocks[1].split("\n```", 1)[0] + "\n"


def run_docs_example(page: Path, default_index: Path, workdir: Path) -> None:
    """Run a docs page's example as written, in ``workdir``, where it finds ``indexes/default``: the session's
    index of the packaged pool, which is what the example would build there (so it is copied, not built)."""
    assert default_pool_path().read_bytes() == (ROOT / "examples" / "demos.jsonl").read_bytes()
    shutil.copytree(default_index, workdir / "indexes" / "default")
    code = docs_example(page)
    exec(compile(code, page.name, "exec"), {"__name__": "__main__"})  # noqa: S102 (the page's own asserts run)


async def ticking(coro: Awaitable[Any]) -> tuple[Any, int]:
    """Await ``coro`` while a ticker counts 10 ms steps of the event loop: many ticks mean the loop stayed
    free while the work ran (in a thread)."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return await coro, ticks
    finally:
        task.cancel()


def clustered(n: int = 3000, d: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors in 40 clusters: synthetic embeddings for indexes of every type."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x
