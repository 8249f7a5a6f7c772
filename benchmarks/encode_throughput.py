"""Encoding throughput: icl-retriever's PIEEncoder.encode vs sentence-transformers' encode.

Same process, same base model architecture (all-MiniLM-L6-v2: sentence-transformers loads the base
weights from the packaged model directory, PIEEncoder the PIE-trained default built on them, which
costs the same per token), same texts, same batch size, same thread count. Two comparisons:

* ``plain``: both embed the raw instructions (PIEEncoder with ``apply_template=False``);
* ``template``: PIEEncoder embeds instructions through its PIE template, sentence-transformers is
  given the identical, already formatted prompts.

Each method is warmed up, then the runs alternate between the two and the best run of each counts.

    python -m benchmarks.encode_throughput            # 2000 eft_test instructions, batch 32, 3 runs
    python -m benchmarks.encode_throughput --quick    # 200 instructions, 2 runs
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from benchmarks._common import machine, query_texts, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="instructions to embed per run (default 2000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per method (best counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 instructions, 2 runs")
    args = ap.parse_args()
    if args.quick:
        args.n, args.runs = 200, 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")

    import torch
    from sentence_transformers import SentenceTransformer

    from icl_retriever import PIEEncoder
    from icl_retriever.default_model import base_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = query_texts(args.n)
    ours = PIEEncoder(device="cpu")
    st = SentenceTransformer(str(base_model_dir()), device="cpu")
    st.max_seq_length = ours.config.max_length
    prompts = ours.format(texts)

    cases = {
        "plain": (
            lambda: ours.encode(texts, batch_size=args.batch_size, apply_template=False, show_progress_bar=False),
            lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False),
        ),
        "template": (
            lambda: ours.encode(texts, batch_size=args.batch_size, show_progress_bar=False),
            lambda: st.encode(prompts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False),
        ),
    }
    rows = []
    for name, (mine, theirs) in cases.items():
        # warm-up (first calls allocate and pick kernels)
        ours.encode(texts[:64], batch_size=args.batch_size, show_progress_bar=False)
        st.encode(texts[:64], batch_size=args.batch_size, show_progress_bar=False)
        best = {"icl-retriever": float("inf"), "sentence-transformers": float("inf")}
        for _ in range(args.runs):
            for label, fn in (("icl-retriever", mine), ("sentence-transformers", theirs)):
                start = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - start)
        a, b = len(texts) / best["icl-retriever"], len(texts) / best["sentence-transformers"]
        rows.append((name, len(texts), args.batch_size, round(a), round(b), a / b))

    # sanity: on the base weights the two compute the same vectors
    from icl_retriever.errors import ModelLoadError

    try:
        base = PIEEncoder("default-base", device="cpu")
    except ModelLoadError:  # a checkout without the "default-base" model name
        base = None
    agree = ""
    if base is not None:
        x = base.encode(texts[:100], apply_template=False, show_progress_bar=False)
        y = st.encode(texts[:100], normalize_embeddings=True, show_progress_bar=False)
        agree = f"; base-weight vectors agree with sentence-transformers' to min cosine {float((x * y).sum(1).min()):.6f}"

    print(f"Encoding throughput on {machine()}")
    print(f"texts: {len(texts)} eft_test instructions (mean {np.mean([len(t) for t in texts]):.0f} chars){agree}")
    print(table(["texts", "n", "batch", "icl-retriever instr/s", "sentence-transformers instr/s", "ratio"], rows))


if __name__ == "__main__":
    main()
