"""Ship a model trained from the packaged base (``icl-retriever train --base-model default-base``) as a
packaged preset (``default`` unless ``--preset``): copy its float16 delta, settings and training card into
the preset's directory (:mod:`icl_retriever.presets`), write reference embeddings that the test-suite compares
the loaded preset against, and measure the shipped preset's floor for ``min_score="auto"`` on the training
files' held-out tasks (``calibration.json``; the shipped preset is float16 delta + 256 tokens, so it is
measured again here).

    python scripts/ship_default.py runs/pie-default
    python scripts/ship_default.py --calibrate-only                 # re-measure the floor of what is shipped
    python scripts/ship_default.py --preset ieb --calibrate-only    # the same for the ieb preset
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Inference budget of the shipped default (training used 128; longer queries keep more of their text).
MAX_LENGTH = 256
PROBES = [
    "Summarize the article below.",
    "Write a poem about the sea.",
    "Tell me some facts about the sea.",
    "Translate 'good night' into German.",
    "Write a SQL query that lists customers from Spain.",
    "Is this review positive or negative? 'The battery died after two days.'",
    "Fix the grammar in this sentence: 'She don't like apples.'",
    "Draft an email to my landlord asking to fix the heating.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, nargs="?", help="output directory of icl-retriever train")
    ap.add_argument("--calibrate-only", action="store_true", help="only re-measure the shipped preset's floor")
    ap.add_argument("--preset", default="default", help="the preset to ship or calibrate (default: default)")
    args = ap.parse_args()
    from icl_retriever import presets

    target = presets.get(args.preset).directory
    if target is None:
        raise SystemExit(f"{args.preset}: the untrained base has no delta to ship or calibrate")
    if args.calibrate_only:
        calibrate_shipped(args.preset)
        return
    if args.model_dir is None:
        ap.error("model_dir is required unless --calibrate-only")
    src: Path = args.model_dir
    reference = ROOT / "tests" / "fixtures" / f"{args.preset}_reference.json"
    card = json.loads((src / "training_card.json").read_text())
    if card["base_model"] not in ("default", "default-base") or not (src / "delta.safetensors").is_file():
        raise SystemExit(f"{src}: not trained from the packaged base (no delta.safetensors)")
    shutil.copyfile(src / "delta.safetensors", target / "delta.safetensors")
    shutil.copyfile(src / "training_card.json", target / "training_card.json")
    config = json.loads((src / "pie_config.json").read_text())
    config["max_length"] = MAX_LENGTH
    (target / "pie_config.json").write_text(json.dumps(config, indent=2) + "\n")

    from icl_retriever import PIEEncoder

    trained = PIEEncoder(src).encode(PROBES)
    shipped = PIEEncoder(args.preset).encode(PROBES)
    diff = float(np.abs(trained - shipped).max())
    print(f"max |trained - shipped {args.preset}| over {len(PROBES)} probes: {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"the shipped {args.preset} preset does not reproduce the trained model")
    reference.write_text(json.dumps({"texts": PROBES, "embeddings": trained.round(6).tolist()}) + "\n")
    size = (target / "delta.safetensors").stat().st_size
    print(f"shipped {target / 'delta.safetensors'} ({size / 2**20:.1f} MiB); reference -> {reference}")
    calibrate_shipped(args.preset)


def calibrate_shipped(preset: str = "default") -> None:
    """Measure the shipped preset's floor on the held-out tasks of the train files of its card."""
    from icl_retriever import PIEEncoder, calibration, presets
    from icl_retriever.training import TrainConfig, write_calibration

    target = presets.get(preset).directory
    assert target is not None
    config = TrainConfig.model_validate((presets.get(preset).training_card() or {})["config"])
    (target / calibration.CALIBRATION_FILE).unlink(missing_ok=True)
    write_calibration(PIEEncoder(preset), config, target)
    found = calibration.load(target)
    if found is None:
        raise SystemExit("no floor could be calibrated (see the warning above)")
    print(f"floor {found.min_score:.4f}: precision {found.precision:.3f} on {found.n_queries} held-out queries "
          f"of {', '.join(found.files)} -> {target / calibration.CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
