"""Build time and peak memory at scale.

Two kinds of row, each measured in a fresh child process (peak RSS is a per-process high-water mark):

* ``full build``: ``build_index`` on a synthetic pool file (default-pool demos repeated with varied
  inputs), everything included: reading and validating the pool, embedding every instruction (and,
  by default, the topic vectors), indexing, recall measurement, writing.
* ``indexing only``: the embedding step is skipped: vectors are the real embeddings of the 385
  default-pool instructions plus Gaussian noise (norm 0.3, renormalised), as in ``latency.py``;
  timed are indexing (+ ef_search / nprobe tuning and recall), writing the index directory, loading
  it back (sha256 verified) and 100 ``get_demos`` queries. Peak RSS covers all of it.
* ``serving``: each indexing-only directory opened again in a fresh process, read into memory and
  memory-mapped (``mmap=True``), sha256 verified, then 100 ``get_demos``: load time, query p50 / p95,
  peak RSS (which counts mapped file pages the process touched) and anonymous RSS after the queries (the
  memory the process itself holds; mapped pages are the OS's cache and can be dropped).

    python -m benchmarks.build_scale                      # full build at 1e5; indexing only at 1e5, 1e6
    python -m benchmarks.build_scale --full-sizes 1e5 --full-types flat hnsw --index-sizes 1e6 --types hnsw
    python -m benchmarks.build_scale --full-sizes --index-sizes 1e6 --types ivfpq --no-topic   # 1e6 IVF-PQ, mapped
    python -m benchmarks.build_scale --quick              # 1e3 everywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._common import (
    ROOT,
    SIGMA,
    default_pool,
    human,
    machine,
    parse_size,
    peak_rss_gib,
    percentiles,
    query_texts,
    synthetic_records,
    synthetic_vectors,
    table,
    time_each,
)


def _dir_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def child_full(n: int, kind: str, workdir: Path, topic: bool) -> dict:
    from icl_retriever import build_index

    pool = workdir / f"pool-{n}.jsonl"
    if not pool.exists():
        tmp = pool.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for r in synthetic_records(n):
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.rename(pool)
    out = workdir / f"full-{n}-{kind}"
    start = time.perf_counter()
    r = build_index(pool, out, index_type=kind, topic=topic, force=True, show_progress_bar=False)
    seconds = time.perf_counter() - start
    manifest = r.manifest
    assert manifest is not None
    return {
        "seconds": seconds,
        "type": manifest.index_type,
        "params": manifest.index_params.model_dump(exclude_none=True),
        "recall": manifest.recall_at_10,
        "peak_gib": peak_rss_gib(),
        "disk_gib": _dir_gib(out),
        "rate": n / seconds,
    }


def child_index(n: int, kind: str, workdir: Path, topic: bool) -> dict:
    from icl_retriever import Demo, PIEEncoder, Retriever
    from icl_retriever.store import (
        TARGET_RECALL,
        TopicInfo,
        describe_index,
        measure_recall,
        new_flat_index,
        new_index,
        save_index,
    )

    encoder = PIEEncoder(device="cpu")
    base = encoder.encode([d["instruction"] for d in default_pool()], show_progress_bar=False)
    demos = [
        Demo.model_construct(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"],
                             metadata=r["metadata"], score=None)
        for r in synthetic_records(n)
    ]
    vectors = synthetic_vectors(base, n, sigma=SIGMA, seed=0)
    start = time.perf_counter()
    index = new_index(vectors, kind)
    recall = measure_recall(index, vectors, tune_to=TARGET_RECALL)
    index_s = time.perf_counter() - start
    del vectors
    topic_index = topic_info = None
    if topic:  # stand-in topic vectors: same construction, other noise
        topic_index = new_flat_index(synthetic_vectors(base, n, sigma=SIGMA, seed=1))
        topic_info = TopicInfo(encoder=encoder.config, fingerprint=encoder.fingerprint, source="same_model_plain",
                               dim=encoder.dim)
    out = workdir / f"index-{n}-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    save_index(out, index, demos, encoder_config=encoder.config, fingerprint=encoder.fingerprint, force=True,
               recall_at_10=recall, **({"topic_index": topic_index, "topic": topic_info} if topic else {}))
    write_s = time.perf_counter() - start
    params = describe_index(index)[1].model_dump(exclude_none=True)
    del index, demos, topic_index
    start = time.perf_counter()
    r = Retriever.from_index(out, encoder=encoder)
    load_s = time.perf_counter() - start
    queries = query_texts(120)
    for q in queries[:20]:
        r.get_demos(q)
    p50, p95 = percentiles(time_each(lambda q: r.get_demos(q), queries[20:]))
    return {
        "index_s": index_s, "write_s": write_s, "load_s": load_s, "p50": p50, "p95": p95, "type": kind,
        "params": params, "recall": recall, "peak_gib": peak_rss_gib(), "disk_gib": _dir_gib(out),
    }


def _anon_rss_gib() -> float:
    """Anonymous resident memory of this process now (Linux ``RssAnon``): what it holds besides mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child_serve(n: int, kind: str, workdir: Path, mmap: bool) -> dict:
    """Open an indexing-only directory in this fresh process and query it."""
    from icl_retriever import PIEEncoder, Retriever

    encoder = PIEEncoder(device="cpu")
    queries = query_texts(120)
    before = _anon_rss_gib()
    start = time.perf_counter()
    r = Retriever.from_index(workdir / f"index-{n}-{kind}", encoder=encoder, mmap=mmap)
    load_s = time.perf_counter() - start
    for q in queries[:20]:
        r.get_demos(q)
    p50, p95 = percentiles(time_each(lambda q: r.get_demos(q), queries[20:]))
    return {"load_s": load_s, "p50": p50, "p95": p95, "peak_gib": peak_rss_gib(),
            "anon_gib": _anon_rss_gib() - before}


def run_child(mode: str, n: int, kind: str, workdir: Path, topic: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.build_scale", "--child", mode, str(n), kind, str(workdir)]
    if not topic:
        cmd.append("--no-topic")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-sizes", nargs="*", default=["1e5"], help="sizes for full builds (default 1e5)")
    ap.add_argument("--full-types", nargs="+", default=["auto"], choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    ap.add_argument("--index-sizes", nargs="*", default=["1e5", "1e6"], help="sizes for indexing only (default 1e5 1e6)")
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw", "ivf", "ivfpq"])
    ap.add_argument("--no-topic", action="store_true", help="no topic vectors (the default build stores them)")
    ap.add_argument("--workdir", type=Path, default=None, help="where pools and indexes go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1e3 everywhere")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "N", "TYPE", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    topic = not args.no_topic
    if args.child:
        mode, n, kind, workdir = args.child
        if mode.startswith("serve"):
            print(json.dumps(child_serve(int(n), kind, Path(workdir), mmap=mode == "serve-mmap")))
            return
        fn = child_full if mode == "full" else child_index
        print(json.dumps(fn(int(n), kind, Path(workdir), topic)))
        return
    if args.quick:
        args.full_sizes, args.index_sizes = ["1e3"], ["1e3"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="icl-build-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, serving = [], []
    try:
        for n in map(parse_size, args.full_sizes):
            for kind in args.full_types:
                res = run_child("full", n, kind, workdir, topic)
                if "error" in res:
                    rows.append([human(n), "full build", kind, res["error"]] + [None] * 8)
                    continue
                params = ", ".join(f"{k} {v}" for k, v in res["params"].items()) or "-"
                rows.append([human(n), "full build (encode all)", f"{res['type']} ({params})", res["seconds"],
                             f"{res['rate']:.0f} demos/s", None, None, res["recall"], res["peak_gib"], res["disk_gib"],
                             None])
        for n in map(parse_size, args.index_sizes):
            for kind in args.types:
                res = run_child("index", n, kind, workdir, topic)
                if "error" in res:
                    rows.append([human(n), "indexing only", kind, res["error"]] + [None] * 8)
                    continue
                params = ", ".join(f"{k} {v}" for k, v in res["params"].items()) or "-"
                rows.append([human(n), "indexing only (synthetic vectors)", f"{kind} ({params})", res["index_s"],
                             None, res["write_s"], res["load_s"], res["recall"], res["peak_gib"], res["disk_gib"],
                             res["p50"]])
                for mode in ("serve", "serve-mmap"):
                    got = run_child(mode, n, kind, workdir, topic)
                    serving.append([human(n), kind, "mapped" if mode == "serve-mmap" else "in memory"] + (
                        [got["error"]] + [None] * 4 if "error" in got else
                        [got["load_s"], got["p50"], got["p95"], got["peak_gib"], got["anon_gib"]]))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"Build time and peak memory on {machine()}")
    print(
        "full build: build_index on a synthetic pool file (default-pool demos repeated with varied inputs), "
        f"encoding every instruction{' and topic text' if topic else ''}. indexing only: embeddings NOT "
        "re-encoded but synthesised (real embeddings of the 385 default-pool instructions + Gaussian noise of "
        f"norm {SIGMA}, renormalised){'; topic vectors synthesised the same way' if topic else ''}; time = "
        "indexing + ef_search/nprobe tuning + recall; then write, load (sha256 verified) and 100 get_demos. "
        "Peak RSS: whole child process."
    )
    print(table(
        ["demos", "mode", "index", "build/index s", "throughput", "write s", "load s", "recall@10", "peak RSS GiB",
         "on disk GiB", "get_demos p50 ms"],
        rows,
    ))
    if serving:
        print("serving: a fresh process opens the index (sha256 verified) and runs 100 get_demos")
        print(table(["demos", "index", "vectors and records", "load s", "p50 ms", "p95 ms", "peak RSS GiB",
                     "anonymous RSS GiB"], serving))


if __name__ == "__main__":
    main()
