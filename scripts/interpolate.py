"""WiSE-FT weight interpolation: base + alpha * (trained - base), for a model trained from the packaged base.

Fine-tuning on IEB's verb|noun labels sharpens task distinctions (IEB counts "summarize an article" and
"summarize a story" as different tasks) at some cost to coarser task families; interpolating the weights
(Wortsman et al., 2022) keeps part of both. Alpha is chosen on the training file's held-out tasks, never on
the test files.

    python scripts/interpolate.py runs/pie-default runs/pie-default-a055 --alpha 0.55
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from icl_retriever import default_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained", type=Path, help="output directory of icl-retriever train (with delta.safetensors)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, required=True)
    args = ap.parse_args()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(default_model.base_model_dir())
    params = model.state_dict()
    with safe_open(str(args.trained / "delta.safetensors"), framework="pt") as fh, torch.no_grad():
        for name in fh.keys():
            params[name].add_(args.alpha * fh.get_tensor(name).float())
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "pie_config.json"):
        shutil.copyfile(args.trained / name, args.out / name)
    base = AutoModel.from_pretrained(default_model.base_model_dir())
    delta = default_model.save_delta(model, base, args.out / "delta.safetensors")
    card = json.loads((args.trained / "training_card.json").read_text())
    card["interpolation"] = {"method": "WiSE-FT", "alpha": args.alpha, "trained": str(args.trained)}
    card["delta"] = delta
    (args.out / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} (alpha {args.alpha})")


if __name__ == "__main__":
    main()
