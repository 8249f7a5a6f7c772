"""Load on ``icl-retriever serve``: latency, throughput and errors at concurrency 1 and N, with and
without CLI ``add`` runs into the served directory during the load, beside the in-process
``Retriever.get_demos`` latency of the same kind of queries.

A real server process is started on a free loopback port over a copy of the index (the default pool
unless ``--index`` is given), and driven by ``--concurrency`` httpx clients until ``--requests`` are
answered or ``--time-cap`` seconds have passed. Every query is a distinct real instruction (eft_test
when present, else the pool's with a twist; a numbered variant once those run out), so neither the
server's nor the reference's query cache answers any of them. During the last run, ``--adds`` CLI
``add`` processes each add one demo; afterwards each added demo must come back from the server
(asked for with a filter on its id).

    python -m benchmarks.serve_load                          # 2000 requests, concurrency 16, 10 adds
    python -m benchmarks.serve_load --requests 100 --adds 2  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import DEFAULT_POOL, machine, query_texts, table

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                 os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Queries:
    """Distinct queries, handed out once each across all runs."""

    def __init__(self) -> None:
        self.texts = query_texts(100_000)
        self.used = 0

    def take(self, n: int) -> list[str]:
        out = []
        for i in range(self.used, self.used + n):
            text, variant = self.texts[i % len(self.texts)], i // len(self.texts)
            out.append(text if variant == 0 else f"{text} (variant {variant})")
        self.used += n
        return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "icl_retriever.cli", *args]


def start_server(index: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cli("serve", str(index), "--port", str(port), "--log-level", "warning", *extra),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server was not ready within 300 s")


def batch_totals(url: str) -> tuple[float, float]:
    """(queries embedded, encoder batches) so far, from the server's metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        values[name] = value
    return (float(values["icl_retriever_encoder_batch_queries_sum"]),
            float(values["icl_retriever_encoder_batch_queries_count"]))


def p(ms: list[float], q: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))] if ms else float("nan")


async def load(url: str, queries: list[str], concurrency: int, k: int, time_cap: float) -> dict[str, Any]:
    """``concurrency`` clients send the queries until all are answered or the time cap is reached."""
    latencies: list[float] = []
    errors: list[str] = []
    it = iter(queries)
    deadline = time.perf_counter() + time_cap
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for query in it:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/demos", json={"query": query, "k": k})
                    if r.status_code != 200 or len(r.json()["demos"]) != k:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                latencies.append(1000 * (time.perf_counter() - start))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"n": len(latencies), "errors": errors, "p50": p(latencies, 0.5), "p99": p(latencies, 0.99),
            "rps": len(latencies) / wall}


def add_in_background(index: Path, n: int, spacing_s: float, workdir: Path) -> tuple[threading.Thread, list[dict[str, Any]], list[str]]:
    """``n`` CLI ``add`` runs, one demo each, one after another ``spacing_s`` apart, in a thread."""
    added: list[dict[str, Any]] = []
    failures: list[str] = []

    def run() -> None:
        for i in range(n):
            demo = {"id": f"serve-load-{i}", "instruction": f"Name {i + 2} prime numbers in increasing order.",
                    "output": ", ".join(str(x) for x in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)[: i + 2]),
                    "task": "serve_load"}
            pool = workdir / f"add-{i}.jsonl"
            pool.write_text(json.dumps(demo) + "\n", encoding="utf-8")
            done = subprocess.run(cli("add", str(index), str(pool)), env=ENV, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                failures.append(done.stderr[-500:])
            else:
                added.append(demo)
            time.sleep(spacing_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, added, failures


def check_added(url: str, index: Path, added: list[dict[str, Any]], timeout_s: float = 30) -> int:
    """How many added demos the server returns once it serves the version on disk."""
    from icl_retriever.store import load_manifest

    want = load_manifest(index).generation
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and httpx.get(f"{url}/v1/index").json()["generation"] < want:
        time.sleep(0.2)
    found = 0
    for demo in added:
        r = httpx.post(f"{url}/v1/demos", json={"query": demo["instruction"], "k": 1, "filter": {"id": demo["id"]}})
        found += r.status_code == 200 and [d["id"] for d in r.json()["demos"]] == [demo["id"]]
    return found


def in_process(index: Path, queries: list[str], k: int, batch: int) -> tuple[float, float]:
    """The in-process ``get_demos`` p50 (ms), and the ceiling of micro-batching on this machine: queries/s of
    ``get_demos_batch`` over ``batch`` queries at a time against ``get_demos`` one at a time (no HTTP at all)."""
    from icl_retriever import Retriever

    retriever = Retriever.from_index(index, cache_size=0)
    retriever.get_demos("Warm up the encoder.", k=k)
    ms = []
    for query in queries:
        start = time.perf_counter()
        retriever.get_demos(query, k=k)
        ms.append(1000 * (time.perf_counter() - start))
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        retriever.get_demos_batch(queries[i : i + batch], k=k)
    batched = time.perf_counter() - start
    return p(ms, 0.5), sum(ms) / 1000 / batched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, default=None, help="index to copy and serve (default: the default pool, built)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000)")
    ap.add_argument("--concurrency", type=int, default=16, help="clients of the concurrent runs (default 16)")
    ap.add_argument("--adds", type=int, default=10, help="CLI add runs during the last run (default 10)")
    ap.add_argument("--time-cap", type=float, default=300.0, help="seconds a run may take at most (default 300)")
    ap.add_argument("-k", type=int, default=4, help="demos per request (default 4)")
    ap.add_argument("--reference", type=int, default=300, help="queries timed in process (default 300)")
    ap.add_argument("--serve-args", default="", help="more flags for icl-retriever serve, e.g. '--batch-window-ms 4'")
    args = ap.parse_args()

    print(f"# serve_load: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        index = work / "index"
        if args.index is not None:
            shutil.copytree(args.index, index)
        else:
            subprocess.run(cli("build", str(DEFAULT_POOL), "--out", str(index)), env=ENV, check=True, capture_output=True)
        queries = Queries()
        reference, ceiling = in_process(index, queries.take(args.reference), args.k, args.concurrency)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(index, port, args.serve_args.split())
        try:
            runs: list[tuple[str, dict[str, Any]]] = []
            for name, conc in (("concurrency 1", 1), (f"concurrency {args.concurrency}", args.concurrency)):
                before = batch_totals(url)
                runs.append((name, asyncio.run(load(url, queries.take(args.requests), conc, args.k, args.time_cap))))
                after = batch_totals(url)
                runs[-1][1]["batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            c1, cn = runs[0][1], runs[1][1]
            spacing = max(0.0, 0.8 * args.requests / cn["rps"] / max(args.adds, 1) - 5.0) if args.adds else 0.0
            thread, added, add_failures = add_in_background(index, args.adds, spacing, work)
            before = batch_totals(url)
            with_adds = asyncio.run(load(url, queries.take(args.requests), args.concurrency, args.k, args.time_cap))
            after = batch_totals(url)
            with_adds["batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            thread.join(timeout=args.time_cap)
            runs.append((f"concurrency {args.concurrency} + {args.adds} CLI adds", with_adds))
            found = check_added(url, index, added)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(table(["run", "requests", "errors", "p50 ms", "p99 ms", "requests/s", "queries per encoder batch"],
                    [(name, r["n"], len(r["errors"]), f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['rps']:.1f}",
                      f"{r['batch']:.1f}") for name, r in runs]))
        print(f"in-process get_demos p50: {reference:.2f} ms (cache off); server p50 at concurrency 1 minus it: "
              f"{c1['p50'] - reference:+.2f} ms")
        print(f"throughput at concurrency {args.concurrency} / concurrency 1: {cn['rps'] / c1['rps']:.2f}x "
              "(issue 33's target on 2 cores: at least 2.5x)")
        print(f"in process, no HTTP: get_demos_batch of {args.concurrency} queries / get_demos one at a time: "
              f"{ceiling:.2f}x (what batching the encoder can buy on this machine)")
        print(f"CLI adds: {len(added)} of {args.adds} succeeded; added demos returned by the server afterwards: "
              f"{found} of {len(added)}" + (f"; add failures: {add_failures}" if add_failures else ""))
        for name, r in runs:
            for err in r["errors"][:3]:
                print(f"error ({name}): {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
