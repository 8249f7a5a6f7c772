"""Is a model task-aware on more than one notion of a task? One table, one row per model.

Columns (each from :func:`icl_retriever.evaluation.evaluate`, the same code as ``icl-retriever eval``):

- IEB eft_test (``verb|noun`` tasks): P@1 leave-one-out (text twins excluded), ARI of KMeans, IIS Spearman;
- SNI dev (generic task categories of Super-NaturalInstructions): cross-dataset P@1, the nearest task
  definition from another source dataset has the query's category;
- the default pool (``examples/demos.jsonl``, 77 tasks of our own): leave-one-out P@1 by ``metadata.task``.

Rows: the base all-MiniLM-L6-v2 with the plain text and with the short PIE prompt, the shipped default, and
every ``--model`` given.

Run: python -m benchmarks.task_notions [--model DIR ...] [--no-base] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FILES = {
    "ict": DATA / "ieb" / "eft_test.json",
    "iis": DATA / "ieb" / "intention_similarity_test.json",
    "cross_group": DATA / "sni" / "sni_dev.json",
    "pool": ROOT / "examples" / "demos.jsonl",
}
COLUMNS = [
    ("IEB P@1", "p_at_1"),
    ("IEB ARI", "ari"),
    ("IIS", "iis_spearman"),
    ("SNI dev x-dataset P@1", "cross_group_p_at_1"),
    ("pool P@1", "pool_p_at_1"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="more models (directories or ids) to measure")
    ap.add_argument("--no-base", action="store_true", help="skip the two base-model rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the reports here")
    args = ap.parse_args()

    from icl_retriever import PIEEncoder
    from icl_retriever.evaluation import evaluate

    files = {k: p for k, p in FILES.items() if p.is_file()}
    missing = sorted(set(FILES) - set(files))
    rows: list[tuple[str, PIEEncoder]] = []
    if not args.no_base:
        rows += [
            ("base, plain (default-base)", PIEEncoder("default-base")),
            ("base, short prompt", PIEEncoder("default-base", template="short")),
        ]
    rows.append(("shipped default", PIEEncoder()))
    rows += [(name, PIEEncoder(name)) for name in args.model]
    reports = {}
    for name, encoder in rows:
        reports[name] = evaluate(
            encoder, files.get("ict"), files.get("iis"), cross_group_path=files.get("cross_group"),
            pool_path=files.get("pool"), show_progress_bar=False,
        )
    print("| model | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, report in reports.items():
        values = [getattr(report, field) for _, field in COLUMNS]
        print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    if missing:
        print(f"(not measured, files absent: {', '.join(missing)})")
    if args.json:
        args.json.write_text(json.dumps({k: r.model_dump() for k, r in reports.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
