"""The validation that ``icl-retriever train`` reports, for any model: to compare soups or interpolations
(``scripts/interpolate.py``) with the runs they came from on the same held-out tasks and sni_dev, never on
test files. The held-out split is that of the training card's configuration (train files, seed, fraction,
``--with-input``), so a trained model's own figures are reproduced exactly.

    python scripts/validate.py --card runs/J/training_card.json runs/J runs/soup
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (or ids) to validate")
    ap.add_argument("--card", type=Path, required=True, help="training_card.json whose configuration holds the split")
    args = ap.parse_args()
    from icl_retriever import PIEEncoder
    from icl_retriever.training import TrainConfig, validate

    config = TrainConfig.model_validate(json.loads(args.card.read_text(encoding="utf-8"))["config"])
    for model in args.models:
        metrics = validate(PIEEncoder(model), config)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tiebreak")
        print(f"{model}: {shown}")


if __name__ == "__main__":
    main()
