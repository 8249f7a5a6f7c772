"""The Ray build against the local one: same answers, throughput with 1 and 2 actors, memory, size on disk.

The pool: the 20,814 raw training instructions of ``eft_train_unsup.json`` written as a JSONL pool in two
files (built here from ../shared/data; nothing is committed). Builds (flat, no topic vectors): local, Ray with
1 actor, Ray with 2 actors, each on a local Ray cluster of this machine's cores (``ray.init(num_cpus=N)``,
Ray's start-up included in the wall time), then Ray with 2 actors into an IVF and an IVF-PQ index. Each build
runs in its own process, so "driver peak RSS" is that build's own high-water mark (VmHWM: the rusage peak
would include the parent's, inherited at fork). Answers: top-1 of 500
eft_test instructions, Ray flat vs local flat (must agree on >= 99%), and recall@10 of the Ray IVF / IVF-PQ
indexes against exact search.

Run: python -m benchmarks.ray_build [--queries 500] [--json FILE]

``--scale N``: one large build instead. N instructions of ``eft_train_unsup.json`` (beyond its 20,814, repeats carry
a marker " (2)", ... so every demo is distinct and is embedded), as Parquet files of 125,000 rows, built on Ray with
2 actors into an IVF-PQ index (no topic vectors); then a fresh process opens it memory-mapped (sha256 and layout
verified), checks the records one at a time, and runs 100 ``get_demos``:

    python -m benchmarks.ray_build --scale 1e6 --work /tmp/ray-1e6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from icl_retriever import PIEEncoder, Retriever, build_index
from icl_retriever.ray_engine import RayOptions
from icl_retriever.store import search

from benchmarks._common import ROOT, query_texts

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


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def child(engine: str, actors: int, kind: str, files: list[Path], out: Path) -> dict[str, object]:
    """One build in this fresh process: wall time, this process's peak RSS, the largest worker's."""
    import ray

    encoder = PIEEncoder(runtime="auto")  # the ONNX export is cached before any timing
    start = time.perf_counter()
    worker_rss = 0.0
    if engine == "ray":
        with WorkerRss() as sampled:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
            build_index([str(f) for f in files], out, encoder=encoder, engine="ray", ray=RayOptions(actors=actors),
                        index_type=kind, topic=False, show_progress_bar=False)
            ray.shutdown()
        worker_rss = sampled.peak
    else:
        build_index([str(f) for f in files], out, encoder=encoder, index_type=kind, topic=False,
                    show_progress_bar=False)
    return {"wall_s": time.perf_counter() - start, "driver_peak_rss_gib": _status_gib("VmHWM"),
            "worker_rss_gib": worker_rss}


def scale(n: int, work: Path, queries: int) -> None:
    """The ``--scale`` run: pool as Parquet, Ray build into IVF-PQ, then a mapped load in a fresh process."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    unsup = json.loads((DATA / "eft_train_unsup.json").read_text(encoding="utf-8"))
    work.mkdir(parents=True, exist_ok=True)
    rows_per_file = 125_000
    for start in range(0, n, rows_per_file):
        texts = [t if i < len(unsup) else f"{t} ({i // len(unsup) + 1})"
                 for i, t in ((i, unsup[i % len(unsup)]) for i in range(start, min(n, start + rows_per_file)))]
        ids = [f"u{i}" for i in range(start, start + len(texts))]
        pq.write_table(pa.table({"id": ids, "instruction": texts}), work / f"pool-{start // rows_per_file:04d}.parquet")
    out = work / "index"
    encoder = PIEEncoder(runtime="auto")
    start_t = time.perf_counter()
    with WorkerRss() as sampled:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        r = build_index(str(work / "pool-*.parquet"), out, encoder=encoder, engine="ray", ray=RayOptions(actors=2),
                        index_type="ivfpq", topic=False, show_progress_bar=False, force=True)
        ray.shutdown()
    wall = time.perf_counter() - start_t
    manifest = r.manifest
    assert manifest is not None
    del r
    print(f"Ray build of {n} demos (2 actors, {os.cpu_count()} cores): {wall:.1f} s wall, {n / wall:.1f} demos/s, "
          f"driver peak RSS {_status_gib('VmHWM'):.2f} GiB, largest worker {sampled.peak:.2f} GiB; index "
          f"{manifest.index_type} {manifest.index_params.model_dump(exclude_none=True)}, recall@10 "
          f"{manifest.recall_at_10}, {dir_size(out) / 2**30:.3f} GiB on disk", flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_build", "--serve", str(out), "--queries",
                           str(queries)], capture_output=True, text=True, check=True, cwd=ROOT)
    print("mapped serving (fresh process):", proc.stdout.strip().splitlines()[-1])


def _status_gib(field: str) -> float:
    """A memory figure of this process image from /proc/self/status (``VmHWM``: peak RSS since exec; the
    rusage peak would include the parent's, inherited at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def serve(path: Path, queries: int) -> dict[str, object]:
    """Open an index memory-mapped (verified), read every record once, then time ``get_demos``."""
    from icl_retriever.store import MappedDemos

    from benchmarks._common import percentiles, time_each

    encoder = PIEEncoder(runtime="auto")
    start = time.perf_counter()
    r = Retriever.from_index(path, encoder=encoder, mmap=True)
    load_s = time.perf_counter() - start
    assert isinstance(r.demos, MappedDemos)
    texts = query_texts(min(queries, 120))
    for q in texts[:20]:
        r.get_demos(q)
    p50, p95 = percentiles(time_each(lambda q: r.get_demos(q, k=4), texts[20:]))
    picked = r.get_demos("Summarize the following article in two sentences.", k=4)
    queried_rss, anon_rss = _status_gib("VmHWM"), _status_gib("RssAnon")
    start = time.perf_counter()
    count = sum(1 for _ in r.demos)  # every record parsed and checked, one at a time
    read_s = time.perf_counter() - start
    return {"demos": len(r), "load_s": round(load_s, 3), "p50_ms": round(p50, 2), "p95_ms": round(p95, 2),
            "records_checked": count, "read_all_records_s": round(read_s, 1),
            "peak_rss_gib_after_queries": round(queried_rss, 3), "anon_rss_gib_after_queries": round(anon_rss, 3),
            "peak_rss_gib_after_reading_all": round(_status_gib("VmHWM"), 3), "example": [d.instruction for d in picked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "ACTORS", "TYPE", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, default=None, help="one build of this many demos (see above)")
    ap.add_argument("--work", type=Path, default=None, help="with --scale: where the pool and index go")
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        print(json.dumps(serve(args.serve, args.queries)))
        return
    if args.scale:
        scale(int(args.scale), args.work or Path(tempfile.mkdtemp(prefix="ray-scale-")), args.queries)
        return
    if args.child:
        engine, actors, kind, work = args.child
        files = [Path(work) / "pool-0.jsonl", Path(work) / "pool-1.jsonl"]
        print(json.dumps(child(engine, int(actors), kind, files, Path(work) / f"{engine}-{actors}-{kind}")))
        return

    texts = json.loads((DATA / "eft_train_unsup.json").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    half = len(texts) // 2
    files = [work / "pool-0.jsonl", work / "pool-1.jsonl"]
    for path, part in zip(files, (texts[:half], texts[half:]), strict=True):
        path.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in part), encoding="utf-8")
    encoder = PIEEncoder(runtime="auto")  # the ONNX export exists before any timing
    queries = query_texts(args.queries)
    qv = encoder.encode(queries, show_progress_bar=False)
    runs = [("local", 0, "flat"), ("ray", 1, "flat"), ("ray", 2, "flat"), ("ray", 2, "ivf"), ("ray", 2, "ivfpq")]
    results: list[dict[str, object]] = []
    exact_index = None
    print(f"pool: {len(texts)} instructions in 2 JSONL files; {os.cpu_count()} CPU cores\n")
    print("| engine | actors | index | wall s | demos/s | driver peak RSS GiB | largest worker RSS GiB | size on disk MiB |"
          " top-1 = local flat | recall@10 vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine, actors, kind in runs:
        out = work / f"{engine}-{actors}-{kind}"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_build", "--child", engine, str(actors), kind,
                               str(work)], capture_output=True, text=True, check=True, cwd=ROOT)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        index = Retriever.from_index(out, encoder=encoder).index
        _, ids = search(index, qv, 10)
        if exact_index is None:  # the first run: the local flat build, the reference
            exact_index = index
        _, exact = search(exact_index, qv, 10)
        same = float(np.mean(ids[:, 0] == exact[:, 0])) if engine == "ray" and kind == "flat" else None
        recall = None
        if kind in ("ivf", "ivfpq"):
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)]))
        wall = float(got["wall_s"])
        row = {"engine": engine, "actors": actors or None, "index": kind, "wall_s": round(wall, 1),
               "demos_per_s": round(len(texts) / wall, 1), "driver_peak_rss_gib": round(got["driver_peak_rss_gib"], 2),
               "worker_rss_gib": round(got["worker_rss_gib"], 2), "size_mib": round(dir_size(out) / 2**20, 1),
               "top1_same_as_local": same, "recall_at_10": recall}
        results.append(row)
        print(f"| {engine} | {actors or '-'} | {kind} | {row['wall_s']} | {row['demos_per_s']} | "
              f"{row['driver_peak_rss_gib']} | {row['worker_rss_gib'] or '-'} | {row['size_mib']} | "
              f"{'-' if same is None else f'{same:.4f}'} | {'-' if recall is None else f'{recall:.4f}'} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
