"""Speed against LangChain, in one run: query latency at 1k and 10k demos, cold start of
``icl-retriever query``, and CLI build throughput.

1. **Query latency.** ``Retriever.get_demos`` (query embedding + search + the default ranking, the LRU
   cache off) for each runtime of ours: ONNX Runtime float32 (the default), torch float32, torch int8
   (``quantize=True``); beside LangChain's ``SemanticSimilarityExampleSelector`` over a
   ``langchain_community`` FAISS store with ``langchain_huggingface.HuggingFaceEmbeddings`` of the same
   base weights (all-MiniLM-L6-v2), what a LangChain user builds. Pools: default-pool demos repeated;
   their vectors are real embeddings plus noise (see ``_common.synthetic_vectors``), not re-encoded.
   Queries: real eft_test instructions, each embedded in the timed call.
2. **Cold start.** Wall time of ``icl-retriever query DIR "..." -k 3`` in a fresh process, per runtime
   (median of ``--cold-runs``), over an index of the default pool; the ONNX export is already cached.
3. **Build.** Wall time (start-up included) of ``icl-retriever build`` per runtime, on the default pool
   and on ``--build-n`` instructions from ``eft_train_unsup.json`` (beyond its 20,814, repeated with a
   marker; such a pool runs the reference, the default and ``--topic static`` only), in demos/s, against
   the reference: the build before the ONNX runtime (``--runtime torch``).

    python -m benchmarks.speed                      # everything (about 15 minutes on 2 cores)
    python -m benchmarks.speed --quick              # 1k only, 50 queries, small build
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


from benchmarks._common import (
    DEFAULT_POOL,
    ROOT,
    SIGMA,
    default_pool,
    human,
    langchain_selector,
    machine,
    parse_size,
    percentiles,
    query_texts,
    synthetic_records,
    synthetic_vectors,
    table,
    time_each,
)

UNSUP = ROOT.parent / "shared" / "data" / "ieb" / "eft_train_unsup.json"
CLI = [sys.executable, "-m", "icl_retriever.cli"]
QUERY = "Translate 'good night' into German."


def hf_embeddings():  # type: ignore[no-untyped-def]
    """What a LangChain user plugs in: ``HuggingFaceEmbeddings`` of the same base weights, normalised."""
    from langchain_huggingface import HuggingFaceEmbeddings

    from icl_retriever.default_model import base_model_dir

    return HuggingFaceEmbeddings(
        model_name=str(base_model_dir()), model_kwargs={"device": "cpu"}, encode_kwargs={"normalize_embeddings": True}
    )


def query_latency(sizes: list[int], n_queries: int, warmup: int, k: int) -> list[list[object]]:
    import faiss

    from icl_retriever import Demo, PIEEncoder, Retriever
    from icl_retriever.topic import TopicKind, default_topic_encoder, topic_info

    texts = query_texts(n_queries + warmup)
    warm, queries = texts[:warmup], texts[warmup:]
    onnx = PIEEncoder(runtime="onnx")
    pool = default_pool()
    base = onnx.encode([d["instruction"] for d in pool], show_progress_bar=False)
    # each retriever gets the topic encoder an index built with its encoder (and --topic KIND) holds
    runtimes: dict[str, tuple[PIEEncoder, TopicKind]] = {
        "icl-retriever, ONNX fp32 (default)": (onnx, True),
        "icl-retriever, ONNX fp32, --topic static": (onnx, "static"),
        "icl-retriever, torch fp32": (PIEEncoder(device="cpu"), True),
        "icl-retriever, ONNX int8 (--quantize)": (PIEEncoder(quantize=True, runtime="onnx"), True),
        "icl-retriever, torch int8 (--quantize --runtime torch)": (PIEEncoder(quantize=True), True),
    }
    topics = {name: default_topic_encoder(enc, kind) for name, (enc, kind) in runtimes.items()}
    topic_texts = [f"{d['instruction']}\n{d['input']}" if d.get("input") else d["instruction"] for d in pool]
    base_topic = {t.fingerprint: t.encode(topic_texts, show_progress_bar=False) for t, _ in topics.values()}
    rows: list[list[object]] = []
    for n in sizes:
        records = synthetic_records(n)
        demos = [Demo.model_construct(score=None, **r) for r in records]
        vectors = synthetic_vectors(base, n, sigma=SIGMA)
        topic_vectors = {fp: synthetic_vectors(v, n, sigma=SIGMA, seed=1) for fp, v in base_topic.items()}
        selector = langchain_selector(hf_embeddings(), vectors, records, k)
        for q in warm:
            selector.select_examples({"instruction": q})
        lc50, lc95 = percentiles(time_each(lambda q: selector.select_examples({"instruction": q}), queries))  # noqa: B023
        rows.append([human(n), "LangChain SemanticSimilarityExampleSelector (FAISS + HuggingFaceEmbeddings)", "-",
                     lc50, lc95, 1.0])
        for name, (enc, kind) in runtimes.items():
            topic, source = topics[name]
            for ranking in ("default", "none") if kind is True else ("default",):
                index = faiss.IndexFlatIP(enc.dim)
                index.add(vectors)
                topic_index = faiss.IndexFlatIP(topic.dim)
                topic_index.add(topic_vectors[topic.fingerprint])
                r = Retriever(enc, index, demos, topic_index=topic_index, topic=topic_info(topic, source),
                              topic_encoder=topic, cache_size=0)
                kw = {} if ranking == "default" else {"rerank": None}
                for q in warm:
                    r.get_demos(q, k=k, **kw)
                p50, p95 = percentiles(time_each(lambda q: r.get_demos(q, k=k, **kw), queries))  # noqa: B023
                label = "task_then_topic" if ranking == "default" else "task order (rerank=None)"
                rows.append([human(n), name, label, p50, p95, p50 / lc50])
        del selector, demos, records, vectors, topic_vectors
        gc.collect()
    return rows


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return wall


def cold_start(work: Path, env: dict[str, str], runs: int) -> list[list[object]]:
    index = work / "cold"
    _wall([*CLI, "build", str(DEFAULT_POOL), "--out", str(index)], env)  # also exports / caches the ONNX copies
    _wall([*CLI, "build", str(DEFAULT_POOL), "--out", str(work / "warm"), "--runtime", "torch"], env)  # digests
    rows: list[list[object]] = []
    for runtime in ("auto", "torch"):
        for rerank in ("auto", "none"):
            cmd = [*CLI, "query", str(index), QUERY, "-k", "3", "--runtime", runtime, "--rerank", rerank]
            _wall(cmd, env)  # warm the page cache
            walls = [_wall(cmd, env) for _ in range(runs)]
            rows.append([runtime, "default (task_then_topic)" if rerank == "auto" else "none", statistics.median(walls),
                         min(walls), max(walls)])
    return rows


#: The build before the ONNX runtime (torch; PIE and contextual topic vectors): the reference of the ratios.
REFERENCE_BUILD = ["--runtime", "torch"]
DEFAULT_BUILD = ["--runtime", "auto"]
STATIC_BUILD = ["--runtime", "auto", "--topic", "static"]
BUILD_FLAGS = [REFERENCE_BUILD, DEFAULT_BUILD, STATIC_BUILD, ["--runtime", "auto", "--quantize"]]


def build_throughput(work: Path, env: dict[str, str], build_ns: list[int]) -> list[list[object]]:
    pools = [("default pool", DEFAULT_POOL, sum(1 for line in DEFAULT_POOL.open() if line.strip()))]
    unsup = json.loads(UNSUP.read_text(encoding="utf-8")) if UNSUP.is_file() else []
    for build_n in (n for n in build_ns if n and unsup):
        # beyond its 20,814 instructions, repeats carry a marker (" (2)", ...) so each demo stays distinct
        texts = [t if i < len(unsup) else f"{t} ({i // len(unsup) + 1})" for i, t in
                 ((i, unsup[i % len(unsup)]) for i in range(build_n))]
        path = work / f"unsup-{build_n}.jsonl"
        path.write_text("".join(json.dumps({"instruction": t, "output": ""}) + "\n" for t in texts), encoding="utf-8")
        name = f"eft_train_unsup, first {build_n}" if build_n <= len(unsup) else f"eft_train_unsup x{build_n / len(unsup):.1f}"
        pools.append((name, path, build_n))
    rows: list[list[object]] = []
    for name, path, n in pools:
        walls = {}
        # a pool beyond the real instructions takes minutes a row: the reference, the default and static only
        for flags in BUILD_FLAGS if n <= len(unsup) or not unsup else [REFERENCE_BUILD, DEFAULT_BUILD, STATIC_BUILD]:
            label = " ".join(flags)
            out = work / f"build-{len(walls)}-{n}"
            walls[label] = _wall([*CLI, "build", str(path), "--out", str(out), *flags], env)
            shutil.rmtree(out)
            reference = walls[" ".join(REFERENCE_BUILD)]
            rows.append([name, n, label, walls[label], n / walls[label], reference / walls[label]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1e3", "1e4"], help="pool sizes for query latency (default 1e3 1e4)")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per row (default 200)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--cold-runs", type=int, default=5, help="fresh processes per cold-start row (default 5)")
    ap.add_argument("--build-n", type=int, nargs="+", default=[5000],
                    help="sizes of the larger builds (default 5000; beyond 20,814 the instructions repeat, marked)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["query", "cold", "build"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k demos, 50 queries, 2 cold runs, 1000-demo build")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries, args.warmup, args.cold_runs, args.build_n = ["1e3"], 50, 10, 2, [1000]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    print(f"Speed on {machine()}")
    with tempfile.TemporaryDirectory(prefix="icl-speed-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if "query" not in args.skip:
            rows = query_latency([parse_size(s) for s in args.sizes], args.queries, args.warmup, args.k)
            print(f"\nQuery latency: get_demos, k={args.k}, {args.queries} eft_test queries per row after {args.warmup} "
                  "warm-up, query cache off; flat index; ratio = p50 / LangChain's p50 at the same size")
            print(table(["demos", "retriever", "ranking", "p50 ms", "p95 ms", "ratio"], rows))
        if "cold" not in args.skip:
            rows = cold_start(work, env, args.cold_runs)
            print(f"\nCold start: `icl-retriever query DIR \"{QUERY}\" -k 3` in a fresh process (default pool index), "
                  f"{args.cold_runs} runs")
            print(table(["--runtime", "--rerank", "median s", "min s", "max s"], rows))
        if "build" not in args.skip:
            rows = build_throughput(work, env, args.build_n)
            print("\nBuild: `icl-retriever build POOL --out DIR FLAGS` wall time, start-up included (PIE and topic "
                  f"vectors); reference: {' '.join(REFERENCE_BUILD)} (the build before the ONNX runtime)")
            print(table(["pool", "demos", "flags", "wall s", "demos/s", "speed-up vs reference"], rows))


if __name__ == "__main__":
    main()
