"""IVF-PQ recall by bytes per demo, on real instruction embeddings.

The 20,814 instructions of ``eft_train_unsup.json`` embedded by the shipped default, indexed as ``ivfpq`` with
each ``pq_m`` (nprobe tuned as a build tunes it), against exact search: recall@10 on probe queries between
stored vectors (what the manifest records) and on real eft_test instructions, and the top-1 agreement.

    python -m benchmarks.pq_recall [--pq-m 24 48 96 192] [--queries 500]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from icl_retriever import PIEEncoder
from icl_retriever.store import IndexParams, measure_recall, new_flat_index, new_index, search

from benchmarks._common import query_texts

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ieb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pq-m", type=int, nargs="+", default=[24, 48, 96, 192])
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    texts = json.loads((DATA / "eft_train_unsup.json").read_text(encoding="utf-8"))
    encoder = PIEEncoder(runtime="auto")
    start = time.perf_counter()
    x = encoder.encode(texts, show_progress_bar=False)
    qv = encoder.encode(query_texts(args.queries), show_progress_bar=False)
    print(f"{len(texts)} instructions and {len(qv)} eft_test queries embedded in {time.perf_counter() - start:.0f} s\n")
    _, exact = search(new_flat_index(x), qv, 10)
    print("| pq_m (bytes a demo) | nlist | nprobe (tuned) | recall@10, probes between stored vectors | "
          "recall@10, eft_test queries | top-1 = exact |")
    print("|---|---|---|---|---|---|")
    for m in args.pq_m:
        index = new_index(x, "ivfpq", IndexParams(pq_m=m))
        probe_recall = measure_recall(index, x, tune_to=0.95)
        _, ids = search(index, qv, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
        top1 = np.mean(ids[:, 0] == exact[:, 0])
        print(f"| {m} | {index.nlist} | {index.nprobe} | {probe_recall:.3f} | {recall:.3f} | {top1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
