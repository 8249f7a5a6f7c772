"""The opt-in int8 encoder (``PIEEncoder(quantize=True)``) against float32: task retrieval and speed.

P@1 / P@4 are leave-one-out nearest neighbours on eft_test (a neighbour with the query's exact
instruction text is excluded, as in ``icl_retriever.evaluation.retrieval_precision``). The int8
encoder is acceptable if it loses no more than 0.01 of float32's P@1. Speed: both encoders embed the same
texts in the same process, alternating, best run of each.

    python -m benchmarks.quantization                  # all 3291 eft_test instructions (a few minutes)
    python -m benchmarks.quantization --quick          # 300 sampled instructions: a smoke run, P@k is noisy
    python -m benchmarks.quantization --all-linear     # also the variant quantising every Linear layer
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from benchmarks._common import EFT_TEST, machine, table

TOLERANCE = 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(EFT_TEST), help="IEB file (default ../shared/data/ieb/eft_test.json)")
    ap.add_argument("--limit", type=int, default=None, help="use a random sample of this many instructions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per encoder (best counts)")
    ap.add_argument("--all-linear", action="store_true", help="also measure int8 on every Linear layer")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 sampled instructions, 1 timed run")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.runs = args.limit or 300, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")

    import torch

    from icl_retriever import PIEEncoder
    from icl_retriever.evaluation import load_ict, retrieval_precision

    texts, labels = load_ict(args.data)
    if args.limit and args.limit < len(texts):
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=args.limit, replace=False))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]

    encoders = {"float32": PIEEncoder(device="cpu"), "int8 (library)": PIEEncoder(quantize=True)}
    if args.all_linear:
        every = PIEEncoder(device="cpu")
        every.model = torch.ao.quantization.quantize_dynamic(every.model, {torch.nn.Linear}, dtype=torch.qint8)
        encoders["int8 (every Linear)"] = every
    for enc in encoders.values():  # warm-up
        enc.encode(texts[:64], batch_size=args.batch_size, show_progress_bar=False)
    vectors: dict[str, np.ndarray] = {}
    best = dict.fromkeys(encoders, float("inf"))
    for _ in range(args.runs):
        for name, enc in encoders.items():
            start = time.perf_counter()
            vectors[name] = enc.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            best[name] = min(best[name], time.perf_counter() - start)

    ref = vectors["float32"]
    ref_p = retrieval_precision(ref, labels, texts, ks=(1, 4))
    rows = []
    verdicts = []
    for name in encoders:
        p = retrieval_precision(vectors[name], labels, texts, ks=(1, 4))
        cos = (vectors[name] * ref).sum(axis=1)
        rows.append([name, p[1], p[4], p[1] - ref_p[1], float(cos.mean()), float(cos.min()),
                     round(len(texts) / best[name]), best["float32"] / best[name]])
        if name != "float32":
            ok = p[1] >= ref_p[1] - TOLERANCE
            verdicts.append(f"{name}: P@1 {p[1] - ref_p[1]:+.4f} vs float32 -> {'PASS' if ok else 'FAIL'} "
                            f"(passes unless it loses more than {TOLERANCE})")
    print(f"int8 vs float32 encoder on {machine()}")
    print(f"{len(texts)} instructions from {args.data}" + (" (random sample: P@k differences are noise-level)"
                                                          if args.limit else "")
          + f", {len(set(labels))} tasks; leave-one-out, identical-text twins excluded; batch {args.batch_size}")
    print(table(["encoder", "P@1", "P@4", "dP@1", "cos to fp32 mean", "cos min", "instr/s", "speed x fp32"], rows))
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
