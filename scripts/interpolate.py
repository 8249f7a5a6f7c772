"""Weight interpolation of models trained from the packaged base: base + sum of w_i * (trained_i - base).

One model with a weight below 1 is WiSE-FT (Wortsman et al., 2022): part of the fine-tuning, part of the
base. Several models with weights summing to 1 are a model soup (Wortsman et al., 2022): the average of
fine-tunings from the same start. Weights are chosen on the training files' held-out tasks and sni_dev
(the validation that ``icl-retriever train`` reports), never on test files.

    python scripts/interpolate.py runs/pie-a055 --delta runs/pie-default:0.55
    python scripts/interpolate.py runs/soup --delta runs/A:0.8 --delta runs/S:0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from icl_retriever import default_model


def _weighted(value: str) -> tuple[Path, float]:
    path, _, weight = value.rpartition(":")
    if not path:
        raise argparse.ArgumentTypeError(f"expected DIR:WEIGHT, got {value!r}")
    return Path(path), float(weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--delta", type=_weighted, action="append", required=True, metavar="DIR:WEIGHT",
                    help="output directory of icl-retriever train (with delta.safetensors) and its weight")
    args = ap.parse_args()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(default_model.base_model_dir())
    for trained, weight in args.delta:
        default_model.apply_delta(model, trained / "delta.safetensors", scale=weight)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    first = args.delta[0][0]
    for name in ("tokenizer.json", "tokenizer_config.json", "pie_config.json"):
        shutil.copyfile(first / name, args.out / name)
    base = AutoModel.from_pretrained(default_model.base_model_dir())
    delta = default_model.save_delta(model, base, args.out / "delta.safetensors")
    card = json.loads((first / "training_card.json").read_text())
    card["interpolation"] = {"deltas": [[str(p), w] for p, w in args.delta]}
    card["delta"] = delta
    (args.out / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out}: base + " + " + ".join(f"{w} x {p}" for p, w in args.delta))


if __name__ == "__main__":
    main()
