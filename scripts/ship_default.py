"""Ship a model trained from the packaged base (``icl-retriever train --base-model default-base``) as the
embedded default: copy its float16 delta, settings and training card into ``icl_retriever/default_model``,
write reference embeddings that the test-suite compares the loaded default against, and measure the
shipped default's floor for ``min_score="auto"`` on the training files' held-out tasks
(``calibration.json``; the shipped default is float16 delta + 256 tokens, so it is measured again here).

    python scripts/ship_default.py runs/pie-default
    python scripts/ship_default.py --calibrate-only     # re-measure the floor of what is shipped
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "icl_retriever" / "default_model"
REFERENCE = ROOT / "tests" / "fixtures" / "default_reference.json"
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
    ap.add_argument("--calibrate-only", action="store_true", help="only re-measure the shipped default's floor")
    args = ap.parse_args()
    if args.calibrate_only:
        calibrate_shipped()
        return
    if args.model_dir is None:
        ap.error("model_dir is required unless --calibrate-only")
    src: Path = args.model_dir
    card = json.loads((src / "training_card.json").read_text())
    if card["base_model"] not in ("default", "default-base") or not (src / "delta.safetensors").is_file():
        raise SystemExit(f"{src}: not trained from the packaged base (no delta.safetensors)")
    shutil.copyfile(src / "delta.safetensors", TARGET / "delta.safetensors")
    shutil.copyfile(src / "training_card.json", TARGET / "training_card.json")
    config = json.loads((src / "pie_config.json").read_text())
    config["max_length"] = MAX_LENGTH
    (TARGET / "pie_config.json").write_text(json.dumps(config, indent=2) + "\n")

    from icl_retriever import PIEEncoder

    trained = PIEEncoder(src).encode(PROBES)
    shipped = PIEEncoder().encode(PROBES)
    diff = float(np.abs(trained - shipped).max())
    print(f"max |trained - shipped default| over {len(PROBES)} probes: {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("the shipped default does not reproduce the trained model")
    REFERENCE.write_text(json.dumps({"texts": PROBES, "embeddings": trained.round(6).tolist()}) + "\n")
    size = (TARGET / "delta.safetensors").stat().st_size
    print(f"shipped {TARGET / 'delta.safetensors'} ({size / 2**20:.1f} MiB); reference -> {REFERENCE}")
    calibrate_shipped()


def calibrate_shipped() -> None:
    """Measure the shipped default's floor on the held-out tasks of the train files of its card."""
    from icl_retriever import PIEEncoder, calibration
    from icl_retriever.training import TrainConfig, write_calibration

    config = TrainConfig.model_validate(json.loads((TARGET / "training_card.json").read_text())["config"])
    (TARGET / calibration.CALIBRATION_FILE).unlink(missing_ok=True)
    write_calibration(PIEEncoder(), config, TARGET)
    found = calibration.load(TARGET)
    if found is None:
        raise SystemExit("no floor could be calibrated (see the warning above)")
    print(f"floor {found.min_score:.4f}: precision {found.precision:.3f} on {found.n_queries} held-out queries "
          f"of {', '.join(found.files)} -> {TARGET / calibration.CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
