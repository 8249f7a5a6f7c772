"""The validation that ``icl-retriever train`` reports, for any model: to compare soups or interpolations
(``scripts/interpolate.py``) with the runs they came from on the same held-out tasks and sni_dev, never on
test files. The held-out split is that of the training card's configuration (train files, seed, fraction,
``--with-input``), so a trained model's own figures are reproduced exactly.

With ``--against MODEL`` each model's score is also compared with MODEL's query by query: the paired
difference of the two scores and its standard error (queries where both hit or both miss cancel), which says
whether a difference of a few validation queries can be told from noise.

    python scripts/validate.py --card runs/J/training_card.json runs/J runs/soup
    python scripts/validate.py --card runs/J/training_card.json --against default runs/R
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (or ids) to validate")
    ap.add_argument("--card", type=Path, required=True, help="training_card.json whose configuration holds the split")
    ap.add_argument("--against", metavar="MODEL", help="reference model: print each model's paired score difference")
    args = ap.parse_args(argv)
    from icl_retriever import PIEEncoder
    from icl_retriever.evaluation import paired_difference
    from icl_retriever.training import TrainConfig, validation_hits, validation_report

    config = TrainConfig.model_validate(json.loads(args.card.read_text(encoding="utf-8"))["config"])
    reference = validation_hits(PIEEncoder(args.against), config) if args.against else None
    for model in args.models:
        metrics, hits = validation_report(PIEEncoder(model), config)  # one encoding for both
        print(f"{model}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tiebreak"))
        if reference is not None:
            diff, se = paired_difference(reference, hits)
            changed = ", ".join(f"{name} {int((hits[name] != reference[name]).sum())} of {len(hits[name])}" for name in hits)
            print(f"  score minus {args.against}'s: {diff:+.4f} +- {se:.4f} (paired; queries that differ: {changed})")


if __name__ == "__main__":
    main()
