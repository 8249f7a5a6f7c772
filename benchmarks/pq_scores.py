"""What returning cosines costs and changes on an IVF-PQ index, against FAISS's raw inner products.

The default pool's instructions, embedded by the shipped default and spread into ``--n`` demos
(``synthetic_vectors``), indexed as ``ivfpq`` (default ``pq_m``); the queries are real instructions not in
the pool (eft_test when present). In one process, for the same queries:

- ``raw``: ``index.search`` (FAISS's inner products with the reconstructions, best first);
- ``cosines``: ``store.search`` (each divided by the reconstruction's norm, re-sorted, range-checked).

It prints the search time of both (single queries: p50 / p95; one batch) and their ratio, the largest score
each returns (raw inner products can exceed 1), the top-1 agreement of each with exact search over the true
vectors, and the load check: the time to measure every code's reconstruction (``pq_out_of_range``) next to
a whole load of the index. Run it on a quiet machine; a smoke run: ``--n 5000 --queries 50``.

    python -m benchmarks.pq_scores --n 100000 --queries 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import default_pool, machine, percentiles, query_texts, synthetic_vectors, time_each


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="demos in the index")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("-k", type=int, default=20, help="results per query (a search's candidates)")
    args = parser.parse_args(argv)

    from icl_retriever import PIEEncoder
    from icl_retriever.records import Demo
    from icl_retriever.store import load_version, new_flat_index, new_index, save_index, search
    from icl_retriever.store.pq_codes import pq_out_of_range

    encoder = PIEEncoder()
    base = encoder.encode([d["instruction"] for d in default_pool()], show_progress_bar=False)
    queries = encoder.encode(query_texts(args.queries), show_progress_bar=False)
    x = synthetic_vectors(base, args.n)
    start = time.perf_counter()
    index = new_index(x, "ivfpq")
    print(f"{machine()}\n{args.n} demos, ivfpq nlist {index.nlist} pq_m {index.pq.M}, built in "
          f"{time.perf_counter() - start:.1f} s; {len(queries)} queries, k = {args.k}\n")
    _, exact = new_flat_index(x).search(queries, 1)

    singles = [queries[i : i + 1] for i in range(len(queries))]
    raw_s = time_each(lambda q: index.search(q, args.k), singles)
    cos_s = time_each(lambda q: search(index, q, args.k), singles)
    start = time.perf_counter()
    raw_scores, raw_ids = index.search(queries, args.k)
    raw_batch = time.perf_counter() - start
    start = time.perf_counter()
    cos_scores, cos_ids = search(index, queries, args.k)
    cos_batch = time.perf_counter() - start
    (raw50, raw95), (cos50, cos95) = percentiles(raw_s), percentiles(cos_s)
    print("| | single query p50 / p95 (ms) | batch (ms) | largest score | top-1 = exact |")
    print("|---|---|---|---|---|")
    for name, p50, p95, batch, scores, ids in (("raw", raw50, raw95, raw_batch, raw_scores, raw_ids),
                                                ("cosines", cos50, cos95, cos_batch, cos_scores, cos_ids)):
        print(f"| {name} | {p50:.3f} / {p95:.3f} | {1000 * batch:.1f} | {scores.max():.4f} | "
              f"{np.mean(ids[:, 0] == exact[:, 0]):.3f} |")
    print(f"\ncosines / raw: single p50 {cos50 / raw50:.2f}, batch {cos_batch / raw_batch:.2f}")

    demos = [Demo(id=str(i), instruction="x") for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        save_index(path, index, demos, encoder_config=encoder.config, fingerprint=encoder.fingerprint)
        for mmap in (False, True):
            start = time.perf_counter()
            loaded = load_version(path, mmap=mmap).index
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            assert pq_out_of_range(loaded) is None
            check_s = time.perf_counter() - start
            print(f"load{' (mmap)' if mmap else ''}: {load_s:.2f} s, of which about {check_s:.2f} s measuring every "
                  f"code's reconstruction ({1e9 * check_s / args.n:.0f} ns a demo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
