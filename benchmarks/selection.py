"""Diverse data selection: how many distinct tasks do N picks cover?

For each file, every instruction is embedded twice: with the shipped PIE default and with the base model's
plain embedding (all-MiniLM-L6-v2 on the raw text, what a plain embedding selector sees). Then N
instructions are picked by ``icl_retriever.selection.select_diverse`` (k-means and k-center) on each, and
by a uniform random sample (mean and standard deviation over 5 seeds); the figure is the number of
distinct task labels among the picks.

Files: ``eft_train_silver.json`` (685 tasks, 16,460 instructions; the shipped default trained on 90% of
these tasks, so PIE's figures there are flattered) and ``eft_test.json`` (145 tasks, 3,291 instructions,
never trained on).

Run: python -m benchmarks.selection [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from icl_retriever import PIEEncoder, load_pool
from icl_retriever.selection import select_diverse

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ieb"
FILES = {"eft_train_silver": (DATA / "eft_train_silver.json", (200, 500, 1000)),
         "eft_test": (DATA / "eft_test.json", (50, 100, 200))}
SEEDS = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    encoders = {"PIE default": PIEEncoder(runtime="auto"),
                "base, plain": PIEEncoder("default-base", template="plain", runtime="auto")}
    results = []
    for name, (path, sizes) in FILES.items():
        demos = load_pool(path)
        labels = [str(d.metadata["task"]) for d in demos]
        texts = [d.instruction for d in demos]
        vectors = {}
        for enc_name, enc in encoders.items():
            start = time.perf_counter()
            vectors[enc_name] = enc.encode(texts, batch_size=64, show_progress_bar=False)
            print(f"{name}: embedded {len(texts)} instructions with {enc_name} in {time.perf_counter() - start:.0f} s",
                  flush=True)
        print(f"\n{name}: {len(set(labels))} tasks, {len(texts)} instructions; distinct tasks covered by N picks\n")
        print("| N | random (5 seeds) | " + " | ".join(f"{m}, {e}" for e in encoders for m in ("k-means", "k-center"))
              + " |")
        print("|---|---|" + "---|" * 2 * len(encoders))
        for n in sizes:
            rand = [len({labels[r] for r in select_diverse(vectors["PIE default"], n, method="random", seed=s)})
                    for s in range(SEEDS)]
            row = {"file": name, "n": n, "random_mean": float(np.mean(rand)), "random_sd": float(np.std(rand))}
            cells = [f"{np.mean(rand):.1f} +- {np.std(rand):.1f}"]
            for enc_name in encoders:
                for method in ("kmeans", "kcenter"):
                    start = time.perf_counter()
                    rows = select_diverse(vectors[enc_name], n, method=method)
                    covered = len({labels[r] for r in rows})
                    row[f"{method}|{enc_name}"] = covered
                    row[f"{method}|{enc_name}|seconds"] = round(time.perf_counter() - start, 2)
                    cells.append(str(covered))
            results.append(row)
            print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
