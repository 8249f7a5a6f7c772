"""Static topic vectors (icl_retriever/encoder/static.py) and the contextual ones older indexes hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from icl_retriever import PIEEncoder, Retriever, build_index
from icl_retriever.default_model import base_model_dir
from icl_retriever.encoder.static import IDF_FILE, StaticEmbedder, idf_table
from icl_retriever.errors import EncoderMismatchError, ModelLoadError
from icl_retriever.store import all_vectors, load_manifest
from icl_retriever.topic import default_topic_encoder, shared_base_encoder, shared_static_embedder, topic_info, topic_text

from helpers import POOL, ids

#: Two demos of one task that differ in content only.
SUMMARIES = [
    {"id": "sum-meeting", "instruction": "Summarize the text below in one sentence.",
     "input": "The quarterly budget meeting ran two hours over because of the new office lease.", "output": "Overran."},
    {"id": "sum-football", "instruction": "Summarize the text below in one sentence.",
     "input": "The home team scored in extra time to win the cup final in front of a record crowd.", "output": "Won."},
]


def test_static_vector_is_the_idf_weighted_sum_of_distinct_word_pieces() -> None:
    static = StaticEmbedder()
    directory = base_model_dir()
    table = load_file(str(directory / "model.safetensors"))["embeddings.word_embeddings.weight"]
    idf = np.load(IDF_FILE, allow_pickle=False)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128 pieces
    pieces = tokenizer.encode("Write a haiku, a haiku.", add_special_tokens=False).ids
    distinct = sorted(set(pieces))
    assert len(distinct) < len(pieces)  # "a", "haiku" and "," repeat: each counts once
    expected = (table[distinct] * idf[distinct, None]).sum(axis=0)
    np.testing.assert_allclose(static.encode(["Write a haiku, a haiku."])[0], expected / np.linalg.norm(expected), atol=1e-6)
    assert idf[tokenizer.token_to_id("the")] < idf[tokenizer.token_to_id("german")]  # frequent pieces weigh less
    vectors = static.encode(["Write a haiku about rain.", "", "Write a haiku about rain."])
    assert vectors.shape == (3, 384) and static.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert not vectors[1].any()  # no word piece: the zero vector, cosine 0 to everything
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(static.encode("Write a haiku about rain."), vectors[0])


def test_idf_table_is_what_the_script_computes() -> None:
    """The shipped table's formula, on a toy corpus (the table itself: ``scripts/topic_idf.py``)."""
    idf = idf_table([[1, 2, 2], [2, 3], []], 5)
    np.testing.assert_allclose(idf, np.log(4 / (np.array([0, 1, 2, 1, 0]) + 1)) + 1, rtol=1e-6)


def test_static_vectors_follow_content() -> None:
    v = StaticEmbedder().encode([
        "Summarize the match report: the striker scored twice in the final.",
        "Translate into French: the striker scored twice in the final.",
        "Summarize the quarterly earnings call of the bank.",
    ])
    assert v[0] @ v[1] > v[0] @ v[2]  # the same content under another task is nearer than the same task


def test_static_fingerprint_is_stable_and_its_own() -> None:
    a, b = StaticEmbedder(), StaticEmbedder()
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    assert a.fingerprint != shared_base_encoder("cpu").fingerprint
    assert topic_info(a, "base_static").source == "base_static"


def test_static_needs_the_packaged_base(tmp_path: Path, encoder: PIEEncoder) -> None:
    with pytest.raises(ModelLoadError, match="packaged base model only"):
        StaticEmbedder("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="static topic vectors are made for the trained presets"):
        default_topic_encoder(shared_base_encoder("cpu"), "static")
    with pytest.raises(ValueError, match="topic must be True, False, 'static' or 'contextual', got 'yes'"):
        build_index(POOL, tmp_path / "idx", encoder=encoder, topic="yes")  # type: ignore[arg-type]
    assert not (tmp_path / "idx").exists()


def test_static_topic_vectors_on_request(tmp_path: Path, encoder: PIEEncoder) -> None:
    out = tmp_path / "idx"
    build_index(POOL[:6], out, encoder=encoder, topic="static")
    topic = load_manifest(out).topic
    assert topic is not None and topic.source == "base_static" and topic.fingerprint == shared_static_embedder().fingerprint
    r = Retriever.from_index(out, encoder=encoder)
    assert r.topic_encoder() is shared_static_embedder()
    np.testing.assert_allclose(
        all_vectors(r.topic_index), shared_static_embedder().encode([topic_text(d) for d in r.demos]), atol=1e-6
    )


def test_contextual_topic_vectors_are_the_default(tmp_path: Path, encoder: PIEEncoder) -> None:
    """``topic=True`` (and ``"contextual"``) stores the base model's contextual vectors (``source="base_model"``);
    the index is queried with that model."""
    base = shared_base_encoder("cpu")
    build_index([*POOL, *SUMMARIES], tmp_path / "old", encoder=encoder)
    assert load_manifest(tmp_path / "old").topic == load_manifest(
        build_index(POOL[:2], tmp_path / "ctx", encoder=encoder, topic="contextual").path
    ).topic
    again = Retriever.from_index(tmp_path / "old", encoder=encoder)
    assert again.topic is not None and again.topic.source == "base_model"
    assert isinstance(again.topic_encoder(), PIEEncoder) and again.topic_encoder().fingerprint == base.fingerprint
    np.testing.assert_allclose(
        all_vectors(again.topic_index), base.encode([topic_text(d) for d in again.demos]), atol=1e-5
    )
    query = "Summarize the text below in one sentence.\nThe goalkeeper saved a penalty in the final."
    assert ids(again.get_demos(query, k=1, rerank="task_then_topic")) == ["sum-football"]
    # topic vectors that claim the static embedder but were made by another are refused, not mixed
    forged = Retriever(encoder, again.index, again.demos, topic_index=again.topic_index,
                       topic=topic_info(base, "base_model").model_copy(update={"source": "base_static"}))
    with pytest.raises(EncoderMismatchError, match="topic vectors were made by encoder"):
        forged.get_demos(query, k=1, rerank="task_then_topic")
