"""Two ONNX Runtime settings of the encoder, each against the alternative in one process.

1. **Query threads.** Single forward passes of real eft_test queries (the default model with its template,
   and the base model on plain text, the topic vectors' model) on a session with 1 or 2 intra-op threads whose
   pool threads sleep between operators (the old setting) or spin and stop at the end of the run (the library's
   query session now). Rounds alternate the sessions query by query, so drifts of a shared machine hit all alike.
2. **Batch size.** ``PIEEncoder.encode`` of eft_train_unsup instructions (the build's path: two batches side by
   side, one thread each) at several batch sizes, alternated over ``--rounds``.

    python -m benchmarks.onnx_settings                 # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np

from benchmarks._common import ROOT, machine, query_texts, table

UNSUP = ROOT.parent / "shared" / "data" / "ieb" / "eft_train_unsup.json"


def _session(path: str, threads: int, spin: bool):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def query_threads(n_queries: int) -> list[list[object]]:
    from icl_retriever import PIEEncoder

    texts = query_texts(n_queries + 20)
    rows: list[list[object]] = []
    for label, encoder in (("default model, template", PIEEncoder(runtime="onnx")),
                           ("base model, plain (topic)", PIEEncoder("default-base", template="plain", runtime="onnx"))):
        prompts = encoder.format(texts) if encoder.config.template != "plain" else texts
        fast = encoder._fast  # the ONNX runtime's tokenizer: the ids the library feeds
        feeds = []
        for ids in fast.ids(prompts, max_length=encoder.config.max_length):
            input_ids, mask = fast.pad([ids])
            feeds.append({"input_ids": input_ids, "attention_mask": mask})
        path = str(encoder.runtime_model._path)
        sessions = {(t, s): _session(path, t, s) for t in (1, 2) for s in (False, True)}
        for session in sessions.values():
            for feed in feeds[:20]:
                session.run(None, feed)
        times: dict[tuple[int, bool], list[float]] = {key: [] for key in sessions}
        keys = list(sessions)
        for i, feed in enumerate(feeds[20:]):
            for key in keys if i % 2 else reversed(keys):
                start = time.perf_counter()
                sessions[key].run(None, feed)
                times[key].append(time.perf_counter() - start)
        tokens = float(np.mean([f["input_ids"].shape[1] for f in feeds]))
        for threads in (1, 2):
            sleep = statistics.median(times[(threads, False)]) * 1000
            spin = statistics.median(times[(threads, True)]) * 1000
            rows.append([label, f"{tokens:.1f}", threads, sleep, spin, spin / sleep])
    return rows


def batch_sizes(n_texts: int, sizes: list[int], rounds: int) -> list[list[object]]:
    from icl_retriever import PIEEncoder

    raw = json.loads(UNSUP.read_text(encoding="utf-8"))
    texts = [t if isinstance(t, str) else t["instruction"] for t in raw][:n_texts]
    encoder = PIEEncoder(runtime="onnx")
    encoder.encode(texts[:200], show_progress_bar=False)
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for r in range(rounds):
        for size in sizes if r % 2 == 0 else reversed(sizes):
            start = time.perf_counter()
            encoder.encode(texts, batch_size=size, show_progress_bar=False)
            rates[size].append(len(texts) / (time.perf_counter() - start))
    reference = statistics.median(rates[32]) if 32 in rates else None
    return [[size, statistics.median(r), min(r), max(r), statistics.median(r) / reference if reference else "-"]
            for size, r in rates.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=300, help="timed queries per session (default 300)")
    ap.add_argument("--texts", type=int, default=4000, help="instructions per encode (default 4000)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=4, help="alternated rounds per batch size (default 4)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"ONNX Runtime settings on {machine()}")
    rows = query_threads(args.queries)
    print(f"\nOne forward pass per query, p50 ms over {args.queries} eft_test queries (sessions alternated per query)")
    print(table(["model", "tokens", "threads", "sleeping", "spinning, stop at end", "ratio"], rows))
    if UNSUP.is_file():
        rows = batch_sizes(args.texts, args.sizes, args.rounds)
        print(f"\nencode() of the first {args.texts} eft_train_unsup instructions, texts/s over {args.rounds} "
              "alternated rounds; ratio = median / batch 32's")
        print(table(["batch size", "median", "min", "max", "ratio"], rows))


if __name__ == "__main__":
    main()
