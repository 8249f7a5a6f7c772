"""Build -> save -> load -> query round trips, and every way an index can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl_retriever import (
    Demo,
    EncoderMismatchError,
    IndexExistsError,
    IndexFormatError,
    PIEEncoder,
    PoolError,
    Retriever,
    build_index,
)
from icl_retriever.store import DEMOS, MANIFEST_FILE, OFFSETS, TOPIC, VECTORS, load_manifest


def data_file(index_dir: Path, role: str) -> Path:
    """The current version's file for a role (names carry a version token)."""
    return index_dir / load_manifest(index_dir).files[role].name  # type: ignore[index]

POOL = [
    {"id": "poem-sea", "instruction": "Write a poem about the sea.", "output": "Waves roll...", "task": "poem"},
    {"id": "poem-city", "instruction": "Compose a short poem about a busy city.", "output": "Lights...", "task": "poem"},
    {"id": "facts-sea", "instruction": "Tell me three facts about the sea.", "output": "It is salty...", "task": "facts"},
    {"id": "de-1", "instruction": "Translate 'thank you' into German.", "output": "Danke", "task": "translate"},
    {"id": "sum-1", "instruction": "Summarize the text below in one sentence.", "input": "The meeting...",
     "output": "A meeting.", "task": "summarize"},
]


@pytest.fixture()
def small_index(tmp_path: Path, encoder: PIEEncoder) -> Path:
    out = tmp_path / "idx"
    build_index(POOL, out, encoder=encoder)
    return out


def test_round_trip(small_index: Path, encoder: PIEEncoder) -> None:
    names = sorted(p.name for p in small_index.iterdir())
    assert names == sorted(
        [MANIFEST_FILE, *(data_file(small_index, role).name for role in (VECTORS, DEMOS, TOPIC, OFFSETS))]
    )
    assert data_file(small_index, VECTORS).suffix == ".faiss" and data_file(small_index, DEMOS).suffix == ".jsonl"
    r = Retriever.from_index(small_index)  # loads its own encoder from the manifest
    assert len(r) == 5 and r.encoder.fingerprint == encoder.fingerprint
    demos = r.get_demos("Translate 'good night' into German.", k=2)
    assert [type(d) for d in demos] == [Demo, Demo]
    assert demos[0].id == "de-1"
    assert demos[0].score is not None and demos[0].score >= demos[1].score
    assert demos[0].metadata == {"task": "translate"}
    # same answer as the in-memory retriever the build returned
    fresh = Retriever.from_demos(POOL, encoder=encoder)
    assert [d.id for d in fresh.get_demos("Write a haiku about snow.", k=5)] == [
        d.id for d in r.get_demos("Write a haiku about snow.", k=5)
    ]


def test_batch_matches_single(small_index: Path, encoder: PIEEncoder) -> None:
    r = Retriever.from_index(small_index, encoder=encoder)
    queries = ["Write a poem about rain.", "Summarize this report."]
    batch = r.get_demos_batch(queries, k=3)
    for q, got in zip(queries, batch, strict=True):
        single = r.get_demos(q, k=3)
        assert [d.id for d in got] == [d.id for d in single]
        assert [d.score for d in got] == pytest.approx([d.score for d in single], abs=1e-5)


def test_k_bounds(small_index: Path, encoder: PIEEncoder) -> None:
    r = Retriever.from_index(small_index, encoder=encoder)
    assert len(r.get_demos("Write a poem.", k=50)) == 5
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            r.get_demos("Write a poem.", k=bad)
    with pytest.raises(ValueError, match="empty"):
        r.get_demos("   ")


def test_existing_index_needs_force_and_survives_a_failed_build(small_index: Path, encoder: PIEEncoder) -> None:
    before = {p.name: p.read_bytes() for p in small_index.iterdir()}
    with pytest.raises(IndexExistsError, match="force"):
        build_index(POOL[:2], small_index, encoder=encoder)
    with pytest.raises(PoolError):
        build_index([{"instruction": "ok"}, {"output": "no instruction"}], small_index, encoder=encoder, force=True)
    assert {p.name: p.read_bytes() for p in small_index.iterdir()} == before
    assert [p.name for p in small_index.parent.iterdir() if ".tmp-" in p.name] == []  # no temp dirs left
    build_index(POOL[:2], small_index, encoder=encoder, force=True)
    assert len(Retriever.from_index(small_index, encoder=encoder)) == 2


def test_empty_pool_leaves_nothing(tmp_path: Path, encoder: PIEEncoder) -> None:
    with pytest.raises(PoolError, match="no records"):
        build_index([], tmp_path / "idx", encoder=encoder)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_non_index(tmp_path: Path, encoder: PIEEncoder) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(IndexExistsError, match="not an index"):
        build_index(POOL, tmp_path / "notes", encoder=encoder, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexExistsError, match="is a file"):
        build_index(POOL, tmp_path / "file", encoder=encoder, force=True)


def test_missing_and_wrong_paths(tmp_path: Path, encoder: PIEEncoder) -> None:
    with pytest.raises(IndexFormatError, match="no such index"):
        Retriever.from_index(tmp_path / "nope", encoder=encoder)
    (tmp_path / "f").write_text("x")
    with pytest.raises(IndexFormatError, match="is a file"):
        Retriever.from_index(tmp_path / "f", encoder=encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        Retriever.from_index(tmp_path / "empty", encoder=encoder)


def test_missing_data_file(small_index: Path, encoder: PIEEncoder) -> None:
    data_file(small_index, VECTORS).unlink()
    with pytest.raises(IndexFormatError, match=r"\.faiss: missing"):
        Retriever.from_index(small_index, encoder=encoder)


def test_corrupted_data_file(small_index: Path, encoder: PIEEncoder) -> None:
    path = data_file(small_index, DEMOS)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="sha256 differs"):
        Retriever.from_index(small_index, encoder=encoder)


def test_manifest_from_a_different_encoder(small_index: Path, encoder: PIEEncoder) -> None:
    with pytest.raises(EncoderMismatchError, match="rebuild"):
        Retriever.from_index(small_index, encoder=PIEEncoder(template="plain"))
    manifest = json.loads((small_index / MANIFEST_FILE).read_text())
    manifest["fingerprint"] = "sha256:" + "1" * 64
    (small_index / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EncoderMismatchError):
        Retriever.from_index(small_index, encoder=encoder)


def test_invalid_and_newer_manifests(small_index: Path, encoder: PIEEncoder) -> None:
    path = small_index / MANIFEST_FILE
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        Retriever.from_index(small_index, encoder=encoder)
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="newer"):
        Retriever.from_index(small_index, encoder=encoder)
    path.write_text(json.dumps({**good, "count": "many"}))
    with pytest.raises(IndexFormatError, match="field 'count'"):
        Retriever.from_index(small_index, encoder=encoder)
