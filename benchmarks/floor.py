"""What a cosine floor does when the pool may hold no demo of the query's task: ``min_score="auto"``
(the model's calibrated floor) against fixed cosines and no floor.

For every labelled instruction of each file, the query's whole task is removed from the pool for half the
queries (seeded): the right answer is then "no demo". For the other half only the query (and demos with its
exact text) is removed. Per floor it prints how often nothing comes back when the task is absent, how often a
same-task top-1 demo is kept when it is present, and the precision of the kept top-1 demos.

    python -m benchmarks.floor                       # sni_dev (category labels) and eft_test, default model
    python -m benchmarks.floor --files a.json --label-field task --model runs/my-model --fixed 0.5 0.6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from icl_retriever import PIEEncoder
from icl_retriever.calibration import floor_outcomes
from icl_retriever.training import load_task_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = [SHARED / "sni" / "sni_dev.json", SHARED / "ieb" / "eft_test.json"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=Path, nargs="+", default=FILES, help="labelled files (IEB format, or pools)")
    ap.add_argument("--label-field", default=None, help="metadata field of the labels, for demo pools")
    ap.add_argument("--model", default=None, help="encoder (default: the embedded default)")
    ap.add_argument("--fixed", type=float, nargs="+", default=[0.5, 0.6, 0.7], help="fixed cosines to compare")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    encoder = PIEEncoder(args.model)
    auto = encoder.calibrated_floor()
    floors: list[tuple[str, float | None]] = [("none", None)] + [(f"fixed {f:g}", f) for f in args.fixed]
    floors.append((f"auto ({auto:.3f})", auto))
    print("| file | queries | floor | nothing returned, task absent | same-task demo kept, task present | precision of kept |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        start = time.perf_counter()
        tasks = load_task_set(path, label_field=args.label_field)
        pairs = [(text, task) for task, texts in tasks.instructions.items() for text in texts]
        texts, labels = [t for t, _ in pairs], [label for _, label in pairs]
        outcomes = floor_outcomes(encoder.encode(texts, show_progress_bar=False), labels, texts, seed=args.seed)
        for name, floor in floors:
            r = outcomes.rates(floor)
            print(f"| {path.name} | {len(texts)} | {name} | {r['empty_when_absent']:.3f} | {r['kept_when_present']:.3f} "
                  f"| {r['precision']:.3f} |")
        print(f"<!-- {path.name}: {time.perf_counter() - start:.0f} s -->")


if __name__ == "__main__":
    main()
