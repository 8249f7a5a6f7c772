"""FAISS index types in an index directory: HNSW / IVF round trips, recall measured and tuned on save,
rebuilds keeping the type, and the header checks that accept the supported types and refuse the rest
(icl_retriever.store.faiss_index, .recall, .layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from icl_retriever import IndexFormatError, PIEEncoder, Retriever, build_index
from icl_retriever.encoder import EncoderConfig
from icl_retriever.records import Demo
from icl_retriever.store import (
    MANIFEST_FILE,
    VECTORS,
    IndexParams,
    all_vectors,
    describe_index,
    load_index,
    load_manifest,
    measure_recall,
    new_index,
    rebuild_index,
    save_index,
    search,
)

from helpers import POOL, QUERY, ids, resync


def edit_manifest(index_dir: Path, **changes: object) -> None:
    path = index_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def flat_ids(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> list[str]:
    r = build_index(POOL, tmp_path_factory.mktemp("flat") / "idx", encoder=encoder, topic=False)
    assert r.manifest is not None and r.manifest.index_type == "flat" and r.manifest.recall_at_10 is None
    return ids(r.get_demos(QUERY, k=4))


@pytest.fixture(scope="module")
def hnsw_dir(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("hnsw") / "idx"
    build_index(POOL, out, encoder=encoder, index_type="hnsw", index=IndexParams(M=8, ef_construction=40), topic=False)
    return out


# index types ---------------------------------------------------------------------------------


def test_hnsw_round_trip(hnsw_dir: Path, encoder: PIEEncoder, flat_ids: list[str]) -> None:
    manifest = load_manifest(hnsw_dir)
    assert manifest.index_type == "hnsw"
    assert manifest.index_params == IndexParams(M=8, ef_construction=40, ef_search=64)  # ef_search: the default, tuned
    assert manifest.recall_at_10 == 1.0  # ten vectors: the graph finds them all
    r = Retriever.from_index(hnsw_dir, encoder=encoder)
    assert isinstance(r.index, faiss.IndexHNSWFlat) and r.index.hnsw.efSearch == 64
    assert ids(r.get_demos(QUERY, k=4)) == flat_ids
    # the manifest's search breadth is what a load applies
    edit_manifest(hnsw_dir, index_params={"ef_search": 17})
    assert Retriever.from_index(hnsw_dir, encoder=encoder).index.hnsw.efSearch == 17


def test_ivf_round_trip(tmp_path: Path, encoder: PIEEncoder, flat_ids: list[str]) -> None:
    r = build_index(POOL, tmp_path / "idx", encoder=encoder, index_type="ivf", index=IndexParams(nprobe=3), topic=False)
    manifest = load_manifest(tmp_path / "idx")
    assert manifest.index_type == "ivf"
    assert manifest.index_params == IndexParams(nlist=1, nprobe=1)  # ten demos: one cluster; nprobe capped
    assert manifest.recall_at_10 == 1.0
    loaded = Retriever.from_index(tmp_path / "idx", encoder=encoder)
    assert isinstance(loaded.index, faiss.IndexIVFFlat)
    assert ids(loaded.get_demos(QUERY, k=4)) == ids(r.get_demos(QUERY, k=4)) == flat_ids


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_on_disk(tmp_path: Path, index_type: str) -> None:
    """Synthetic clustered vectors: params survive save/load, recall is measured and tuned, rebuilds keep the type."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 32)).astype(np.float32)
    x = centers[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32)).astype(np.float32)
    faiss.normalize_L2(x)
    params = IndexParams(M=12, ef_construction=40, ef_search=8) if index_type == "hnsw" else IndexParams(nlist=40, nprobe=1)
    index = new_index(x, index_type, params)  # type: ignore[arg-type]
    low = measure_recall(index, x)
    tuned = measure_recall(index, x, tune_to=0.99)
    assert low is not None and tuned is not None and tuned >= max(low, 0.99)
    kind, after = describe_index(index)
    assert kind == index_type
    assert (after.ef_search or after.nprobe or 0) > (params.ef_search or params.nprobe or 0)  # tuning raised it
    demos = [Demo(id=str(i), instruction=f"i{i}") for i in range(len(x))]
    cfg = EncoderConfig(model="m", template="{instruction}")
    manifest = save_index(tmp_path / "idx", index, demos, encoder_config=cfg, fingerprint="f", recall_at_10=tuned)
    assert manifest.index_type == index_type and manifest.index_params == after and manifest.recall_at_10 == tuned
    _, loaded, _ = load_index(tmp_path / "idx")
    assert describe_index(loaded) == (index_type, after)
    np.testing.assert_array_equal(all_vectors(loaded), x)
    one = search(loaded, x[:1], 5)
    assert one[1][0, 0] == 0 and faiss.omp_get_max_threads() >= 1
    smaller = rebuild_index(loaded, x[:2000])  # what add / remove do
    assert describe_index(smaller)[0] == index_type and smaller.ntotal == 2000
    # written without a recall: it is measured on save
    assert save_index(tmp_path / "again", loaded, demos, encoder_config=cfg, fingerprint="f").recall_at_10 is not None


# header / allow-list ---------------------------------------------------------------------------


def test_header_checks_accept_new_types_and_refuse_garbage(hnsw_dir: Path, tmp_path: Path, encoder: PIEEncoder) -> None:
    index_dir = tmp_path / "idx"
    shutil.copytree(hnsw_dir, index_dir)
    assert len(Retriever.from_index(index_dir, encoder=encoder)) == len(POOL)
    file = index_dir / load_manifest(index_dir).files[VECTORS].name
    pristine = file.read_bytes()

    def refused(data: bytes, match: str) -> None:
        file.write_bytes(data)
        resync(index_dir)
        with pytest.raises(IndexFormatError, match=match):
            Retriever.from_index(index_dir, encoder=encoder)

    rng = np.random.default_rng(1)
    refused(b"IHNf" + rng.bytes(len(pristine) - 4), "holds .* vectors of dim .* manifest says 10 of dim 384")
    refused(b"IvQR" + pristine[4:], "not a FAISS index of a supported type")
    refused(b"IwPQ" + pristine[4:], "holds a ivfpq index, manifest says hnsw")
    x = np.asarray(Retriever.from_index(hnsw_dir, encoder=encoder).index.reconstruct_n(0, len(POOL)))
    l2 = faiss.IndexHNSWFlat(encoder.dim, 8)  # right shape, wrong metric
    l2.add(x)
    refused(faiss.serialize_index(l2).tobytes(), "not a trained inner-product index")
    refused(faiss.serialize_index(new_index(x, "flat")).tobytes(), "holds a flat index, manifest says hnsw")
    other_m = new_index(x, "hnsw", IndexParams(M=16, ef_construction=40, ef_search=64))
    refused(faiss.serialize_index(other_m).tobytes(), r"is a hnsw index with \{'M': 16")
    file.write_bytes(pristine)
    resync(index_dir)
    edit_manifest(index_dir, index_params={"M": None})
    with pytest.raises(IndexFormatError, match="field 'index_params'"):
        Retriever.from_index(index_dir, encoder=encoder)
    edit_manifest(index_dir, index_params={"M": 8, "nprobe": 4})
    with pytest.raises(IndexFormatError, match="field 'index_params'"):
        Retriever.from_index(index_dir, encoder=encoder)
