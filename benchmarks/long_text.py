"""Cost of text that is thrown away: long queries, a pool with one huge instruction, a tiny Parquet file
of millions of rows whose last row is bad.

Each case runs in a fresh subprocess of a small parent, which prints its wall time and peak RSS
(``ru_maxrss``), so no case inherits another's memory. The pairs to compare are printed side by side with their ratio:

- ``get_demos`` of a 1 KB query vs a 5 MB query (the Python API, model loaded and warmed first; the
  figures are the query's own time and the peak RSS of the whole process);
- ``build_index`` of a small pool vs the same pool plus one 60 MB instruction;
- validating a zstd Parquet pool of 3 million rows with a bad last row (a refusal, not a build).

    python -m benchmarks.long_text                 # all cases
    python -m benchmarks.long_text --rows 300000   # a smaller Parquet pool
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import DEFAULT_POOL, ROOT

_SENTENCE = "The committee met again on Tuesday and postponed the decision about the harbour. "


def _text(chars: int, head: str) -> str:
    """``head`` followed by ordinary sentences, ``chars`` characters in all."""
    body = _SENTENCE * (chars // len(_SENTENCE) + 1)
    return (head + body)[:chars]


# the cases, each run as ``python -m benchmarks.long_text --case NAME --work DIR`` --------------------


def _case_query(work: Path, chars: int) -> dict[str, float]:
    import time

    from icl_retriever import Retriever

    retriever = Retriever.from_index(work / "index")
    retriever.get_demos("Translate 'good night' into German.", k=4)  # load the topic model, warm up
    query = _text(chars, "Summarize the following report in two sentences: ")
    start = time.perf_counter()
    retriever.get_demos(query, k=4)
    return {"seconds": time.perf_counter() - start}


def _case_pool(work: Path, huge: int) -> dict[str, float]:
    """Write the pool of a build case (in a process of its own: making a 60 MB string is not the build)."""
    records = [json.loads(line) for line in DEFAULT_POOL.read_text(encoding="utf-8").splitlines()[:40]]
    if huge:
        records.append({"id": "huge", "instruction": _text(huge, "Summarize this document: ")})
    with (work / f"pool-{huge}.jsonl").open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return {"seconds": 0.0}


def _case_build(work: Path, huge: int) -> dict[str, float]:
    import time

    from icl_retriever import build_index

    start = time.perf_counter()
    build_index(work / f"pool-{huge}.jsonl", work / f"built-{huge}", force=True, show_progress_bar=False)
    return {"seconds": time.perf_counter() - start}


def _case_parquet_file(work: Path, rows: int) -> dict[str, float]:
    """Write the Parquet pool (in a process of its own: making it is not the validation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    instructions = pa.array(["Add the two numbers."] * (rows - 1) + [""])  # the last one is empty: refused
    pq.write_table(pa.table({"instruction": instructions}), work / f"rows-{rows}.parquet", compression="zstd")
    return {"seconds": 0.0}


def _case_parquet(work: Path, rows: int) -> dict[str, float]:
    import time

    from icl_retriever import PoolError, build_index

    path = work / f"rows-{rows}.parquet"
    start = time.perf_counter()
    try:
        build_index(path, work / "never", show_progress_bar=False)
    except PoolError as exc:
        print(f"  refused: {exc}", file=sys.stderr)
    else:
        raise AssertionError("the bad last row was accepted")
    return {"seconds": time.perf_counter() - start, "file_kib": path.stat().st_size / 1024}


def _case_index(work: Path, _: int) -> dict[str, float]:
    from icl_retriever import build_index

    build_index(DEFAULT_POOL, work / "index", show_progress_bar=False)
    return {"seconds": 0.0}


def _run_case(argv: list[str]) -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")  # the truncation warning is expected here
    args = _parser().parse_args(argv)
    work = Path(args.work)
    name, _, size = args.case.partition(":")
    cases = {"index": _case_index, "query": _case_query, "pool": _case_pool, "build": _case_build,
             "parquet-file": _case_parquet_file, "parquet": _case_parquet}
    result = cases[name](work, int(size or 0))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _spawn(case: str, work: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_text", "--case", case, "--work", str(work)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    sys.stderr.write(done.stderr if "refused" in done.stderr else "")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="rows of the Parquet pool (default 3,000,000)")
    parser.add_argument("--huge-mb", type=float, default=60.0, help="the huge instruction, in MB (default 60)")
    parser.add_argument("--query-mb", type=float, default=5.0, help="the long query, in MB (default 5)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    if "--case" in sys.argv:
        _run_case(sys.argv[1:])
        return
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="icl-long-text-") as tmp:
        work = Path(tmp)
        # this process stays small (Linux keeps the peak RSS across exec: a big parent would be every
        # case's floor), so the index the queries use is built in a case of its own
        _spawn("index", work)
        for size in (0, int(args.huge_mb * 1e6)):
            _spawn(f"pool:{size}", work)
        pairs = [
            ("query 1 KB vs long query", "query:1000", f"query:{int(args.query_mb * 1e6)}"),
            ("build small pool vs + huge instruction", "build:0", f"build:{int(args.huge_mb * 1e6)}"),
        ]
        print(f"{'case':42s} {'seconds':>9s} {'peak RSS MiB':>13s}   {'long / short':>14s}")
        for label, short, long in pairs:
            a, b = _spawn(short, work), _spawn(long, work)
            print(f"{label + ' (short)':42s} {a['seconds']:9.3f} {a['peak_rss_mib']:13.0f}")
            print(f"{label + ' (long)':42s} {b['seconds']:9.3f} {b['peak_rss_mib']:13.0f}   "
                  f"time x{b['seconds'] / a['seconds']:.2f}, RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}")
        _spawn(f"parquet-file:{args.rows}", work)
        p = _spawn(f"parquet:{args.rows}", work)
        print(f"{f'Parquet, {args.rows:,} rows, bad last row':42s} {p['seconds']:9.3f} {p['peak_rss_mib']:13.0f}"
              f"   (file {p['file_kib']:.0f} KiB)")


if __name__ == "__main__":
    main()
