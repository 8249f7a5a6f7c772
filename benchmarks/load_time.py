"""What the load-time content checks cost: load an index with the checks on and off, in one process.

The index (default 1e5 demos, random unit vectors, topic vectors, varied demo records) is written once
with the library's own writer (no encoder needed) and cached under ``--workdir``. Each round then loads
it (sha256 verified, as ``Retriever.from_index`` does) three ways, in rotating order:

- ``checks on``: ``store.load_version`` as shipped;
- ``checks off``: the same, with the content checks (HNSW / IVF layout walk, unit-vector / id checks,
  demo record rules) replaced by no-ops;
- ``before`` (with ``--before REV``): the loader of git revision REV (e.g. the commit before the
  hardening), run on the same files.

It prints the median of each and the ratios; the issue's bar is ``checks on / before <= 1.20``. Run it
on a quiet machine; a smoke run: ``python -m benchmarks.load_time --n 2000 --rounds 2``.

    python -m benchmarks.load_time --n 100000 --rounds 7 --before 1d2a97b
    python -m benchmarks.load_time --n 100000 --index-type hnsw
    python -m benchmarks.load_time --n 100000 --index-type ivfpq --mmap   # every code's reconstruction measured
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, n: int, kind: str, dim: int = 384, seed: int = 0) -> None:
    """An index of ``n`` synthetic demos with random unit vectors, written by ``save_index``."""
    from icl_retriever.encoder import EncoderConfig
    from icl_retriever.store import TopicInfo, new_flat_index, new_index, save_index
    from icl_retriever.records import Demo

    rng = np.random.default_rng(seed)

    def unit(rows: int) -> np.ndarray:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    demos = [
        Demo(id=f"demo-{i:07d}", instruction=f"Write a short answer to question number {i} about topic {i % 977}.",
             input="" if i % 3 else f"Some input text for demo {i}, a sentence or two long.",
             output=f"An answer of moderate length for demo {i}, with a few more words in it.",
             metadata={"task": f"task_{i % 500}", "domain": ["a", "b", "c"][i % 3]})
        for i in range(n)
    ]
    cfg = EncoderConfig(model="default", template="{instruction}")
    topic = TopicInfo(encoder=cfg, fingerprint="sha256:topic", source="same_model_plain", dim=dim)
    shutil.rmtree(out, ignore_errors=True)
    save_index(out, new_index(unit(n), kind), demos, encoder_config=cfg, fingerprint="sha256:bench", force=True,
               topic_index=new_flat_index(unit(n)), topic=topic)


@contextlib.contextmanager
def checks_off() -> Iterator[None]:
    """The loader with its content checks replaced by no-ops (file type, size and sha256 checks stay)."""
    from icl_retriever.store import layout, reader

    saved = (reader._check_contents, reader._check_demos, layout._Layout.check)
    reader._check_contents = lambda *a, **k: None
    reader._check_demos = lambda *a, **k: None
    layout._Layout.check = lambda *a, **k: None
    try:
        yield
    finally:
        reader._check_contents, reader._check_demos, layout._Layout.check = saved


def loader_of(rev: str) -> Callable[..., object]:
    """``load_version`` of ``icl_retriever/index_store.py`` at git revision ``rev`` (other modules as now).

    That single file held the store before it became the ``icl_retriever.store`` package, so ``rev`` must be a
    revision from before that split.
    """
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:icl_retriever/index_store.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "index_store_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("icl_retriever._index_store_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module.load_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="demos in the index (default 1e5)")
    parser.add_argument("--index-type", choices=["flat", "hnsw", "ivf", "ivfpq"], default="flat")
    parser.add_argument("--mmap", action="store_true", help="load memory-mapped (load_version(..., mmap=True))")
    parser.add_argument("--rounds", type=int, default=5, help="loads per variant (median reported)")
    parser.add_argument("--before", default=None, metavar="REV", help="also time the loader of this git revision")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icl-retriever-load-time")
    parser.add_argument("--rebuild", action="store_true", help="write the index again even if cached")
    args = parser.parse_args(argv)

    from icl_retriever.store import load_version

    out = args.workdir / f"n{args.n}-{args.index_type}"
    if args.rebuild or not (out / "manifest.json").is_file():
        start = time.perf_counter()
        build(out, args.n, args.index_type)
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    variants: dict[str, Callable[[], object]] = {"checks on": lambda: load_version(out, mmap=args.mmap)}

    def off() -> object:
        with checks_off():
            return load_version(out, mmap=args.mmap)

    variants["checks off"] = off
    if args.before:
        before = loader_of(args.before)
        variants[f"before ({args.before})"] = lambda: before(out)
    for load in variants.values():  # warm the page cache and imports once
        load()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    mapped = ", memory-mapped" if args.mmap else ""
    print(f"{args.n} demos, {args.index_type}{mapped}, topic vectors, sha256 verified, {args.rounds} rounds (median s):")
    for name, seconds in median.items():
        print(f"  {name:<24} {seconds:8.3f}")
    print(f"  checks on / checks off   {median['checks on'] / median['checks off']:8.3f}")
    if args.before:
        print(f"  checks on / before       {median['checks on'] / median[names[-1]]:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
