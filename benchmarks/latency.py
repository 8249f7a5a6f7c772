"""End-to-end ``Retriever.get_demos`` latency (query encoding + search) by pool size and index type,
beside LangChain's ``SemanticSimilarityExampleSelector`` over its FAISS vector store with the same
embedding model.

Synthetic pools: demo i is default-pool demo ``i % 385`` with its own id and a varied input. Only
instructions are embedded, so instead of re-encoding up to a million copies of 385 instructions,
each demo's vector is the real embedding of its instruction plus Gaussian noise (norm 0.3,
renormalised); the script says so in its output. Queries are real instructions from eft_test that
are not in the pool, each embedded by ``get_demos`` itself (the query cache is off). Every index
is searched through the same ``Retriever``; HNSW / IVF get the build's defaults, ``ef_search`` /
``nprobe`` tuned to recall@10 >= 0.95 as ``build_index`` does; recall@10 is then measured again on
the real queries against exact search.

    python -m benchmarks.latency                                   # 1e3 1e4 1e5 1e6, flat and hnsw
    python -m benchmarks.latency --sizes 1e5 --types hnsw          # one cell
    python -m benchmarks.latency --quick                           # 1e3 only, 50 queries
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import time
import warnings

import numpy as np

from benchmarks._common import (
    SIGMA,
    default_pool,
    human,
    langchain_selector,
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


def pie_embeddings(encoder):  # type: ignore[no-untyped-def]
    """The same PIE encoder as a LangChain ``Embeddings`` (both sides embed queries alike)."""
    from langchain_core.embeddings import Embeddings

    class PIEEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return encoder.encode(texts, show_progress_bar=False).tolist()

        def embed_query(self, text: str) -> list[float]:
            return encoder.encode(text).tolist()

    return PIEEmbeddings()


def time_retriever(r, warm: list[str], queries: list[str], qvecs: np.ndarray, k: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """get_demos p50 / p95 and search-only p50, in ms."""
    from icl_retriever.store import search

    for q in warm:
        r.get_demos(q, k=k)
    p50, p95 = percentiles(time_each(lambda q: r.get_demos(q, k=k), queries))
    s50, _ = percentiles(time_each(lambda v: search(r.index, v[None, :], k), qvecs))
    return p50, p95, s50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1e3", "1e4", "1e5", "1e6"], help="pool sizes (default 1e3 1e4 1e5 1e6)")
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--queries", type=int, default=200, help="timed queries per cell (default 200)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=SIGMA, help="noise norm of the synthetic vectors (default 0.3)")
    ap.add_argument("--no-langchain", action="store_true", help="skip the LangChain comparison")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto", help="encoder runtime (default auto)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1e3 demos, 50 queries")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries, args.warmup = ["1e3"], 50, 10
    sizes = [parse_size(s) for s in args.sizes]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")

    import faiss
    import torch

    from icl_retriever import Demo, PIEEncoder, Retriever
    from icl_retriever.store import TARGET_RECALL, describe_index, measure_recall, new_index

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    encoder = PIEEncoder(device="cpu", runtime=args.runtime)
    base = encoder.encode([d["instruction"] for d in default_pool()], show_progress_bar=False)
    texts = query_texts(args.queries + args.warmup)
    warm, queries = texts[: args.warmup], texts[args.warmup :]
    qvecs = encoder.encode(queries, show_progress_bar=False)
    no_cache = {"cache_size": 0} if "cache_size" in inspect.signature(Retriever).parameters else {}

    rows = []
    lc_note = None
    for n in sizes:
        records = synthetic_records(n)
        demos = [
            Demo.model_construct(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"],
                                 metadata=r["metadata"], score=None)
            for r in records
        ]
        vectors = synthetic_vectors(base, n, sigma=args.sigma)
        exact, _ = faiss.knn(qvecs, vectors, min(10, n), metric=faiss.METRIC_INNER_PRODUCT)
        threshold = exact[:, -1:] - 1e-5
        p50_by_type = {}
        for kind in args.types:
            start = time.perf_counter()
            index = new_index(vectors, kind)
            measure_recall(index, vectors, tune_to=TARGET_RECALL)  # as build_index does for default params
            build_s = time.perf_counter() - start
            params = describe_index(index)[1].model_dump(exclude_none=True)
            scores, ids = index.search(qvecs, min(10, n))
            recall = float(((scores >= threshold) & (ids >= 0)).mean()) if kind != "flat" else 1.0
            p50, p95, s50 = time_retriever(Retriever(encoder, index, demos, **no_cache), warm, queries, qvecs, args.k)
            p50_by_type[kind] = p50
            rows.append([human(n), kind, ", ".join(f"{k_} {v}" for k_, v in params.items()) or "-", build_s, recall,
                         p50, p95, s50, None, None, None])
            del index
            gc.collect()
        if not args.no_langchain:
            try:
                selector, lc_note = langchain_selector(pie_embeddings(encoder), vectors, records, args.k), "FAISS (flat IP)"
            except ImportError:
                selector, lc_note = None, "langchain-community is not installed (pip install -e '.[bench]')"
            if selector is not None:
                for q in warm:
                    selector.select_examples({"instruction": q})
                l50, l95 = percentiles(time_each(lambda q: selector.select_examples({"instruction": q}), queries))  # noqa: B023
                for row in rows:
                    if row[0] == human(n):
                        row[8], row[9], row[10] = l50, l95, l50 / p50_by_type[row[1]]
            del selector
        del demos, records, vectors
        gc.collect()

    print(f"get_demos latency on {machine()}")
    print(
        f"Synthetic pools: default-pool demos (385) repeated with varied inputs; vectors are the real embeddings of "
        f"their instructions plus Gaussian noise (norm {args.sigma}, renormalised), NOT re-encoded. "
        f"{len(queries)} real eft_test queries per cell, each embedded by get_demos (PIE default encoder, fp32, "
        f"{encoder.runtime}), "
        f"k={args.k}, after {len(warm)} warm-up queries. recall@10: on those queries vs exact search."
    )
    if not args.no_langchain:
        print(f"LangChain: SemanticSimilarityExampleSelector over langchain_community {lc_note}, same vectors, "
              f"same PIE encoder as its Embeddings; ratio = LangChain p50 / icl-retriever p50.")
    print(table(
        ["demos", "index", "params", "build s", "recall@10", "p50 ms", "p95 ms", "search-only p50 ms",
         "LangChain p50 ms", "LangChain p95 ms", "ratio"],
        rows,
    ))
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
