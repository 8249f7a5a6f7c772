"""The Ray build against the local one: same answers, throughput with 1 and 2 actors, memory, size on disk.

The pool: the 20,814 raw training instructions of ``eft_train_unsup.json`` written as a JSONL pool in two
files (built here from ../shared/data; nothing is committed). Builds (flat, no topic vectors): local, Ray with
1 actor, Ray with 2 actors, each on a local Ray cluster of this machine's cores (``ray.init(num_cpus=N)``,
Ray's start-up included in the wall time), then Ray with 2 actors into an IVF index. Answers: top-1 of
500 eft_test instructions, Ray flat vs local flat (must agree on >= 99%), and recall@10 of the Ray IVF
index against exact search.

Run: python -m benchmarks.ray_build [--queries 500] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from icl_retriever import PIEEncoder, build_index
from icl_retriever.ray_engine import RayOptions
from icl_retriever.store import search

from benchmarks._common import query_texts

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ieb"


class WorkerRss:
    """Samples, every 0.2 s while running, the largest RSS of any child process (the Ray workers), in GiB."""

    def __enter__(self) -> WorkerRss:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss / 2**30)
                except psutil.Error:
                    pass

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def driver_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import ray

    texts = json.loads((DATA / "eft_train_unsup.json").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    half = len(texts) // 2
    files = [work / "pool-0.jsonl", work / "pool-1.jsonl"]
    for path, part in zip(files, (texts[:half], texts[half:]), strict=True):
        path.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in part), encoding="utf-8")
    encoder = PIEEncoder(runtime="auto")  # the ONNX export exists before any timing
    queries = query_texts(args.queries)
    qv = encoder.encode(queries, show_progress_bar=False)
    runs = [("local", None, "flat"), ("ray", 1, "flat"), ("ray", 2, "flat"), ("ray", 2, "ivf")]
    results: list[dict[str, object]] = []
    exact_index = None
    print(f"pool: {len(texts)} instructions in 2 JSONL files; {os.cpu_count()} CPU cores\n")
    print("| engine | actors | index | wall s | demos/s | driver peak RSS GiB | largest worker RSS GiB | size on disk MiB |"
          " top-1 = local flat | recall@10 vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine, actors, kind in runs:
        out = work / f"{engine}-{actors}-{kind}"
        start = time.perf_counter()
        worker_rss = 0.0
        if engine == "ray":
            with WorkerRss() as sampled:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
                r = build_index([str(f) for f in files], out, encoder=encoder, engine="ray",
                                ray=RayOptions(actors=actors), index_type=kind, topic=False, show_progress_bar=False)
                ray.shutdown()
            worker_rss = sampled.peak
        else:
            r = build_index([str(f) for f in files], out, encoder=encoder, index_type=kind, topic=False,
                            show_progress_bar=False)
        wall = time.perf_counter() - start
        _, ids = search(r.index, qv, 10)
        if exact_index is None:  # the first run: the local flat build, the reference
            exact_index = r.index
        _, exact = search(exact_index, qv, 10)
        same = float(np.mean(ids[:, 0] == exact[:, 0])) if engine == "ray" and kind == "flat" else None
        recall = None
        if kind == "ivf":
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)]))
        row = {"engine": engine, "actors": actors, "index": kind, "wall_s": round(wall, 1),
               "demos_per_s": round(len(texts) / wall, 1), "driver_peak_rss_gib": round(driver_peak_rss_gib(), 2),
               "worker_rss_gib": round(worker_rss, 2), "size_mib": round(dir_size(out) / 2**20, 1),
               "top1_same_as_local": same, "recall_at_10": recall}
        results.append(row)
        print(f"| {engine} | {actors or '-'} | {kind} | {row['wall_s']} | {row['demos_per_s']} | "
              f"{row['driver_peak_rss_gib']} | {row['worker_rss_gib'] or '-'} | {row['size_mib']} | "
              f"{'-' if same is None else f'{same:.4f}'} | {'-' if recall is None else f'{recall:.4f}'} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
