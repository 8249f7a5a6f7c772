"""The shipped default: PIE-trained delta on the packaged base, loaded offline, reproducing training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from icl_retriever import PIEEncoder
from icl_retriever import default_model

REFERENCE = Path(__file__).parent / "fixtures" / "default_reference.json"


def test_delta_is_shipped_small_and_safetensors() -> None:
    assert default_model.DELTA_FILE.is_file()
    assert default_model.DELTA_FILE.stat().st_size <= 25 * 2**20
    with safe_open(str(default_model.DELTA_FILE), framework="pt") as fh:
        assert fh.metadata()["base_sha256"] == default_model.BASE_SHA256
        names = list(fh.keys())
    assert names and not any("word_embeddings" in n for n in names)


def test_default_reproduces_the_trained_model(encoder: PIEEncoder) -> None:
    ref = json.loads(REFERENCE.read_text())
    got = encoder.encode(ref["texts"])
    assert float(np.abs(got - np.asarray(ref["embeddings"], dtype=np.float32)).max()) <= 1e-3


def test_default_differs_from_its_base(encoder: PIEEncoder) -> None:
    base = PIEEncoder("default-base", template=encoder.config.template)
    texts = ["Write a poem about the sea.", "Tell me facts about the sea."]
    assert float(np.abs(encoder.encode(texts) - base.encode(texts)).max()) > 1e-2
    assert base.fingerprint != encoder.fingerprint


def test_training_card_describes_the_default() -> None:
    card = json.loads((default_model.HERE / "training_card.json").read_text())
    assert card["base_weights_sha256"] == default_model.BASE_SHA256
    assert card["steps_done"] > 0 and card["train_files_sha256"] and all(len(h) == 64 for h in card["train_files_sha256"])
    assert card["config"]["temperature"] == 0.05
