"""Fuzzing the two parsers of untrusted files: any input gives a result or our own exception."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icl_retriever import Demo, ICLRetrieverError, PIEEncoder, build_index, load_pool
from icl_retriever.store import MANIFEST_FILE, load_index, load_manifest

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
record_like = st.dictionaries(
    st.sampled_from(["id", "instruction", "input", "output", "metadata", "task", "score", "x"]), json_values, max_size=6
)


def _write_and_load(data: bytes) -> list[Demo] | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pool.jsonl"
        path.write_bytes(data)
        try:
            return load_pool(path)
        except ICLRetrieverError:
            return None


@FUZZ
@given(st.binary(max_size=300))
def test_pool_parser_on_arbitrary_bytes(data: bytes) -> None:
    result = _write_and_load(data)
    assert result is None or all(isinstance(d, Demo) for d in result)


@FUZZ
@given(st.lists(record_like | json_values, max_size=5), st.sampled_from(["jsonl", "list", "ieb"]))
def test_pool_parser_on_json_shaped_input(records: list[object], layout: str) -> None:
    if layout == "jsonl":
        text = "\n".join(json.dumps(r) for r in records)
    elif layout == "list":
        text = json.dumps(records)
    else:
        text = json.dumps({"task|x": {"samples": records}})
    result = _write_and_load(text.encode())
    if result is not None:
        for demo in result:
            assert demo.instruction.strip() and json.loads(demo.model_dump_json())


@pytest.fixture(scope="module")
def index_template(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "idx"
    build_index([{"id": "a", "instruction": "Write a poem."}, {"id": "b", "instruction": "Add 2 and 2."}], out, encoder=encoder)
    return out


def _nested_keys(obj: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            keys.append((*prefix, k))
            keys.extend(_nested_keys(v, (*prefix, k)))
    return keys


@FUZZ
@given(which=st.integers(min_value=0), value=json_values, delete=st.booleans())
def test_manifest_loader_on_mutated_manifests(index_template: Path, which: int, value: object, delete: bool) -> None:
    manifest = json.loads((index_template / MANIFEST_FILE).read_text())
    keys = _nested_keys(manifest)
    path = keys[which % len(keys)]
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "idx"
        shutil.copytree(index_template, target)
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
        try:
            loaded, index, demos = load_index(target)
        except ICLRetrieverError:
            return
        assert index.ntotal == loaded.count == len(demos)


@FUZZ
@given(st.binary(max_size=400))
def test_manifest_loader_on_arbitrary_bytes(index_template: Path, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "idx"
        shutil.copytree(index_template, target)
        (target / MANIFEST_FILE).write_bytes(data)
        with pytest.raises(ICLRetrieverError):
            load_manifest(target)


def test_mutated_index_files_load_cleanly_or_are_refused() -> None:
    """300 mutated FAISS / demos / offset files (flat, HNSW, IVF, IVF-PQ, topic), the manifest forged to vouch for
    most of them, each loaded into memory or memory-mapped in a child process under a timeout: a clean load whose
    search is right (every score a cosine in [-1, 1], the cosine of the demo it names) or an IndexFormatError, never
    another exception, a wrong score, a crash or a hang (``python -m benchmarks.fuzz_index --cases N`` runs more).
    Mutations aimed at IVF-PQ codebooks and codes are among them, and some of each load (a code pointing at another
    honest centroid) while others are refused (a reconstruction that cannot be a unit vector)."""
    from benchmarks.fuzz_index import run

    report = run(300, seed=0, timeout=60)
    assert report["failures"] == []
    assert report["outcomes"]["refused"] > 0 and report["outcomes"]["loaded"] > 0
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):
        assert report["by_part"][f"loaded {kind} vectors:rows" if kind != "ivfpq" else "loaded ivfpq vectors:codes"] > 0
    for part in ("codebook", "codes"):
        assert report["by_part"][f"loaded ivfpq vectors:{part}"] > 0 and report["by_part"][f"refused ivfpq vectors:{part}"] > 0
