"""Fault injection on an index directory: every damaged file is a clear error, nothing is executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import faiss
import numpy as np
import pytest

from icl_retriever import IndexFormatError, PIEEncoder, Retriever, build_index
from icl_retriever.store import DEMOS, MANIFEST_FILE, VECTORS, load_manifest

from helpers import resync

POOL = [
    {"id": f"d{i}", "instruction": text, "output": "ok", "task": task}
    for i, (text, task) in enumerate(
        [
            ("Write a poem about the sea.", "poem"),
            ("Write a poem about a city.", "poem"),
            ("Translate 'hello' into German.", "translate"),
            ("Translate 'thanks' into French.", "translate"),
            ("Summarize the text below.", "summarize"),
        ]
    )
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "idx"
    build_index(POOL, out, encoder=encoder)
    return out


def data_file(index_dir: Path, role: str) -> Path:
    return index_dir / load_manifest(index_dir).files[role].name  # type: ignore[index]


def rewrite_manifest(index_dir: Path, **changes: object) -> None:
    path = index_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def load(index_dir: Path, encoder: PIEEncoder, **kw: object) -> Retriever:
    return Retriever.from_index(index_dir, encoder=encoder, **kw)  # type: ignore[arg-type]


def test_pristine_copy_loads(index_dir: Path, encoder: PIEEncoder) -> None:
    assert len(load(index_dir, encoder)) == 5


@pytest.mark.parametrize("role", [VECTORS, DEMOS])
def test_truncated_file(index_dir: Path, encoder: PIEEncoder, role: str) -> None:
    file = data_file(index_dir, role)
    file.write_bytes(file.read_bytes()[:-7])
    for verify in (True, False):  # the size check survives verify=False
        with pytest.raises(IndexFormatError, match=rf"{file.name}: size .*\(truncated"):
            load(index_dir, encoder, verify=verify)


@pytest.mark.parametrize("role", [VECTORS, DEMOS])
def test_flipped_bit(index_dir: Path, encoder: PIEEncoder, role: str) -> None:
    file = data_file(index_dir, role)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=rf"{file.name}: sha256 differs"):
        load(index_dir, encoder)


def test_foreign_file_in_place_of_vectors(index_dir: Path, encoder: PIEEncoder) -> None:
    file = data_file(index_dir, VECTORS)
    file.write_bytes(b"GIF89a" + os.urandom(file.stat().st_size - 6))
    resync(index_dir, VECTORS)
    with pytest.raises(IndexFormatError, match="not a FAISS index"):
        load(index_dir, encoder)


def test_faiss_index_of_other_shape(index_dir: Path, encoder: PIEEncoder) -> None:
    other = faiss.IndexFlatIP(encoder.dim)
    other.add(np.eye(3, encoder.dim, dtype=np.float32))  # 3 vectors where the manifest says 5
    faiss.write_index(other, str(data_file(index_dir, VECTORS)))
    resync(index_dir, VECTORS)
    with pytest.raises(IndexFormatError, match="holds 3 vectors of dim 384.*manifest says 5"):
        load(index_dir, encoder)
    wrong_dim = faiss.IndexFlatIP(8)
    wrong_dim.add(np.eye(5, 8, dtype=np.float32))
    faiss.write_index(wrong_dim, str(data_file(index_dir, VECTORS)))
    resync(index_dir, VECTORS)
    with pytest.raises(IndexFormatError, match="dim 8"):
        load(index_dir, encoder)


def test_demos_file_disagrees_with_count(index_dir: Path, encoder: PIEEncoder) -> None:
    file = data_file(index_dir, DEMOS)
    file.write_text("".join(file.read_text().splitlines(keepends=True)[:4]))
    resync(index_dir, DEMOS)
    with pytest.raises(IndexFormatError, match="holds 4 demos, manifest says 5"):
        load(index_dir, encoder)


def test_newer_format_version(index_dir: Path, encoder: PIEEncoder) -> None:
    rewrite_manifest(index_dir, format_version=2)
    with pytest.raises(IndexFormatError, match="format version 2 is newer"):
        load(index_dir, encoder)


def test_manifest_cannot_point_outside_the_directory(index_dir: Path, encoder: PIEEncoder) -> None:
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())
    manifest["files"]["demos"]["name"] = "../../etc/passwd.jsonl"
    (index_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="not a demos file name"):
        load(index_dir, encoder)


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_never_opened(index_dir: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name in ("index.pkl", "docstore.pkl", "demos.pkl", "manifest.pkl"):
        (index_dir / name).write_bytes(pickle.dumps(_Payload(marker)))

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a pickle load was attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert len(load(index_dir, encoder)) == 5
    assert not marker.exists()
    # A pickle in the place of the vectors file, with a manifest forged to match it, is refused too.
    data_file(index_dir, VECTORS).write_bytes(pickle.dumps(_Payload(marker)))
    resync(index_dir, VECTORS)
    with pytest.raises(IndexFormatError, match="not a FAISS index"):
        load(index_dir, encoder)
    assert not marker.exists()


def test_no_pickle_capable_loader_in_the_package() -> None:
    root = Path(__file__).resolve().parents[1] / "icl_retriever"
    for source in root.rglob("*.py"):
        text = source.read_text()
        for needle in ("import pickle", "pickle.load", "Unpickler", "torch.load(", "allow_pickle=True", "joblib", "dill"):
            assert needle not in text, f"{source}: mentions {needle}"
