"""The encoder on the real packaged model: shape, dtype, norms, determinism, template, loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import ModelLoadError, PIEEncoder
from icl_retriever import default_model
from icl_retriever.encoder import TEMPLATES, apply_template

TEXTS = [
    "Summarize the article below.",
    "Write a poem about the sea",
    "Write a poem about autumn.",
    "Tell me some facts about the sea.",
    "Translate 'good night' into German.",
]


def test_shape_dtype_and_unit_norm(encoder: PIEEncoder) -> None:
    X = encoder.encode(TEXTS)
    assert X.shape == (len(TEXTS), encoder.dim) == (5, 384)
    assert X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


def test_single_string_gives_a_vector(encoder: PIEEncoder) -> None:
    assert encoder.encode(TEXTS[0]).shape == (encoder.dim,)


def test_deterministic_and_independent_of_batching(encoder: PIEEncoder) -> None:
    a = encoder.encode(TEXTS, batch_size=2)
    b = encoder.encode(TEXTS, batch_size=32)
    c = encoder.encode(list(reversed(TEXTS)), batch_size=3)[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_template_is_applied(encoder: PIEEncoder) -> None:
    prompt = encoder.format(["Write a poem about autumn."])[0]
    assert prompt == apply_template("Write a poem about autumn.", encoder.config.template, encoder.config.add_period)
    assert "Write a poem about autumn." in prompt and prompt != "Write a poem about autumn."
    with_template = encoder.encode(TEXTS[:2])
    plain = encoder.encode(TEXTS[:2], apply_template=False)
    assert not np.allclose(with_template, plain, atol=1e-3)


def test_pie_period_rule() -> None:
    assert apply_template("Write a poem", TEMPLATES["plain"], True) == "Write a poem."
    for ending in ('Is it?', 'Say "hi"', "Say 'hi'", "Stop."):
        assert apply_template(ending, TEMPLATES["plain"], True) == ending


def test_fingerprint_covers_settings(encoder: PIEEncoder) -> None:
    other = PIEEncoder(template="plain")
    assert other.fingerprint != encoder.fingerprint
    assert PIEEncoder().fingerprint == encoder.fingerprint


def test_long_instruction_is_truncated_with_a_warning(encoder: PIEEncoder) -> None:
    with pytest.warns(UserWarning, match="truncated"):
        x = encoder.encode("Summarize this: " + "word " * 20_000)
    assert np.isfinite(x).all()
    # the template's ending survives the cut
    assert encoder.format(["word " * 20_000])[0].endswith(encoder.config.template.split("{instruction}")[1])


def test_no_transformers_length_notice_for_long_instructions() -> None:
    """Only our own warning reaches the user, not transformers' "Token indices sequence length is longer"."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        fresh = PIEEncoder("default-base")  # a tokenizer that has not warned yet
        with pytest.warns(UserWarning, match="truncated"):
            fresh.encode(["word " * 2_000, "short"], batch_size=1)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]


def test_rejects_bad_template() -> None:
    with pytest.raises(ValueError, match="instruction"):
        PIEEncoder(template="no placeholder here")


def test_local_directory_loads(tmp_path: Path) -> None:
    base = default_model.base_model_dir()
    local = tmp_path / "minilm"
    shutil.copytree(base, local)
    enc = PIEEncoder(local, template="plain")
    assert enc.config.model == str(local.resolve())
    assert enc.encode(TEXTS).shape == (5, 384)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        PIEEncoder(tmp_path)  # an empty directory holds no model
    with pytest.raises(ModelLoadError, match="not a file|directory"):
        (tmp_path / "f.bin").write_bytes(b"x")
        PIEEncoder(tmp_path / "f.bin")


def test_base_weights_are_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "BASE_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        PIEEncoder()
