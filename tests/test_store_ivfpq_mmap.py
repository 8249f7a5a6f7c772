"""Indexes for pools that outgrow memory: IVF-PQ (``pq_m`` bytes a demo) and memory-mapped loading of every
index type, with the same integrity checks as a load into memory (icl_retriever.store)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from icl_retriever import IndexFormatError, PIEEncoder, Retriever, build_index
from icl_retriever.cli import main
from icl_retriever.records import Demo
from icl_retriever.store import (
    DEMOS,
    MANIFEST_FILE,
    OFFSETS,
    VECTORS,
    MappedDemos,
    IndexParams,
    all_vectors,
    describe_index,
    load_index,
    load_manifest,
    measure_recall,
    new_index,
    rebuild_index,
    save_index,
)

from helpers import POOL, SMALL_INDEX_PARAMS, SYNTHETIC_CFG, clustered, resync

CFG = SYNTHETIC_CFG
PARAMS = SMALL_INDEX_PARAMS


def write(path: Path, kind: str, x: np.ndarray) -> Path:
    index = new_index(x, kind, PARAMS[kind])  # type: ignore[arg-type]
    demos = [Demo(id=str(i), instruction=f"instruction {i}") for i in range(len(x))]
    save_index(path, index, demos, encoder_config=CFG, fingerprint="f")
    return path


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_mmap_load_answers_as_a_load_into_memory(tmp_path: Path, kind: str) -> None:
    x = clustered()
    path = write(tmp_path / "idx", kind, x)
    manifest, in_memory, demos = load_index(path)
    _, mapped, mapped_demos = load_index(path, mmap=True)
    assert describe_index(mapped) == describe_index(in_memory) == (kind, manifest.index_params)
    if kind in ("ivf", "ivfpq"):  # the inverted lists are read from the file on demand
        assert isinstance(faiss.downcast_InvertedLists(mapped.invlists), faiss.OnDiskInvertedLists)
    queries = x[:50] + x[50:100]
    faiss.normalize_L2(queries)
    for a, b in zip(in_memory.search(queries, 10), mapped.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(mapped_demos, MappedDemos) and list(mapped_demos) == demos
    assert mapped_demos[-1] == demos[-1] and mapped_demos[5:8] == demos[5:8]


def test_ivfpq_keeps_codes_not_vectors(tmp_path: Path) -> None:
    x = clustered(d=64)
    index = new_index(x, "ivfpq", IndexParams(nlist=20, nprobe=20, pq_m=16))
    assert describe_index(index) == ("ivfpq", IndexParams(nlist=20, nprobe=20, pq_m=16))
    demos = [Demo(id=str(i), instruction="x") for i in range(len(x))]
    # without the true vectors (only codes) the recall is unknown; with them, measured against exact search
    assert save_index(tmp_path / "unknown", index, demos, encoder_config=CFG, fingerprint="f").recall_at_10 is None
    recall = measure_recall(index, x)
    assert recall is not None and 0.5 < recall < 1.0
    path = tmp_path / "idx"
    manifest = save_index(path, index, demos, encoder_config=CFG, fingerprint="f", recall_at_10=recall)
    # 16 bytes of code + 8 of id (+ 8 of the id map) a vector, against 256 bytes of float32
    assert manifest.files[VECTORS].size < len(x) * 40 + 100_000
    _, loaded, _ = load_index(path, mmap=True)
    # reconstructions are approximate but close: what reranking and filters read back
    approx = loaded.reconstruct_batch(np.arange(100, dtype=np.int64))
    assert np.abs((approx * x[:100]).sum(axis=1) - 1).max() < 0.2
    with pytest.raises(ValueError, match="ivfpq index stores compressed codes.*rebuild it from the pool"):
        rebuild_index(loaded, x[:10])


def test_ivfpq_parameters_are_checked_before_work(tmp_path: Path, encoder: PIEEncoder) -> None:
    with pytest.raises(ValueError, match="pq_m must divide the dimension 32, got 7"):
        new_index(clustered(), "ivfpq", IndexParams(pq_m=7))
    with pytest.raises(ValueError, match="at least 256 demos .* got 10; use a flat or ivf index"):
        build_index(POOL, tmp_path / "small", encoder=encoder, index_type="ivfpq", topic=False)
    assert not (tmp_path / "small").exists()
    with pytest.raises(ValueError, match="pq_m apply to ivfpq indexes, not ivf"):
        build_index(POOL, tmp_path / "small", encoder=encoder, index_type="ivf", index=IndexParams(pq_m=8))


def test_ivfpq_refused_by_the_cli_on_a_small_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(d) + "\n" for d in POOL))
    assert main(["build", str(pool), "--out", str(tmp_path / "idx"), "--index-type", "ivfpq", "--no-topic"]) != 0
    assert "at least 256 demos" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_retriever_on_an_mmapped_ivfpq_index(tmp_path: Path, default_index: Path, encoder: PIEEncoder) -> None:
    """The default pool (385 demos) as an IVF-PQ index, searched memory-mapped: the same first pick as exact
    search for most queries, with filters and reranking reading approximate vectors back."""
    exact = Retriever.from_index(default_index, encoder=encoder)
    x = all_vectors(exact.index)
    index = new_index(x, "ivfpq", IndexParams(nlist=4, nprobe=4))
    save_index(tmp_path / "pq", index, list(exact.demos), encoder_config=encoder.config,
               fingerprint=encoder.fingerprint, topic_index=exact.snapshot.topic, topic=exact.manifest.topic)
    r = Retriever.from_index(tmp_path / "pq", encoder=encoder, mmap=True)
    assert r.manifest is not None and r.manifest.index_params.pq_m == 96
    queries = [d.instruction for d in exact.demos[::20]]
    same = sum(
        r.get_demos(q, k=1, rerank=None, exclude_query=True)[0].id
        == exact.get_demos(q, k=1, rerank=None, exclude_query=True)[0].id
        for q in queries
    )
    assert same >= 0.8 * len(queries), (same, len(queries))
    picked = r.get_demos("Translate 'good night' into German.", k=3, filter={"task": "translation_en_de"})
    assert [d.metadata["task"] for d in picked] == ["translation_en_de"] * 3
    assert len(r.get_demos("Write a haiku about rain.", k=3)) == 3  # the default ranking, over topic vectors
    with pytest.raises(ValueError, match="rebuild it from the pool"):
        r.add([Demo(id="new", instruction="Write a haiku about snow.")])
    with pytest.raises(ValueError, match="rebuild it from the pool"):
        r.remove([exact.demos[0].id])
    assert load_manifest(tmp_path / "pq").generation == 1  # nothing written


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_mmap_load_refuses_damaged_files(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path / "idx", kind, clustered())
    file = path / load_manifest(path).files[VECTORS].name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="sha256 differs"):
        load_index(path, mmap=True)
    file.write_bytes(bytes(data[:-100]))
    with pytest.raises(IndexFormatError, match="size .* manifest says"):
        load_index(path, mmap=True)
    resync(path)  # a forger: the manifest vouches for the cut file, whose layout still gives it away
    with pytest.raises(IndexFormatError, match="cut short|runs past the end"):
        load_index(path, mmap=True, verify=False)


def test_forged_ivfpq_quantiser_is_refused(tmp_path: Path) -> None:
    """A scaled sub-quantiser would let its demos outscore every other: refused, in memory and mapped."""
    x = clustered()
    path = write(tmp_path / "idx", "ivfpq", x)
    _, index, _ = load_index(path)
    centroids = faiss.vector_to_array(index.pq.centroids)
    centroids[: index.pq.dsub] *= 50  # the first code of the first sub-quantiser
    faiss.copy_array_to_vector(centroids, index.pq.centroids)
    file = path / load_manifest(path).files[VECTORS].name
    file.write_bytes(faiss.serialize_index(index).tobytes())
    resync(path)
    for mmap in (False, True):
        with pytest.raises(IndexFormatError, match="sub-quantiser centroid is not finite or longer than 2"):
            load_index(path, mmap=mmap)


def test_manifest_and_file_must_agree_on_pq_m(tmp_path: Path) -> None:
    path = write(tmp_path / "idx", "ivfpq", clustered())
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["index_params"]["pq_m"] = 4
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="8 sub-quantisers of 8 bits over dim 32, the manifest says 4"):
        load_index(path, mmap=True)
    manifest["index_params"].pop("pq_m")
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="a ivfpq index has parameters"):
        load_index(path)


def test_reload_maps_the_new_version(tmp_path: Path, default_index: Path, encoder: PIEEncoder) -> None:
    """A retriever opened with ``mmap`` maps the version another writer adds, too."""
    exact = Retriever.from_index(default_index, encoder=encoder)
    save_index(tmp_path / "ivf", new_index(all_vectors(exact.index), "ivf", IndexParams(nlist=4, nprobe=4)),
               list(exact.demos), encoder_config=encoder.config, fingerprint=encoder.fingerprint)
    reader = Retriever.from_index(tmp_path / "ivf", encoder=encoder, mmap=True)
    Retriever.from_index(tmp_path / "ivf", encoder=encoder).add([Demo(id="new", instruction="Write a haiku about snow.")])
    assert reader.reload() and len(reader) == len(exact) + 1
    assert isinstance(faiss.downcast_InvertedLists(reader.index.invlists), faiss.OnDiskInvertedLists)
    assert reader.get_demos("Write a haiku about snow.", k=1)[0].id == "new"


def test_mapped_records_are_read_one_at_a_time_and_checked(tmp_path: Path) -> None:
    path = write(tmp_path / "idx", "flat", clustered(n=300))
    manifest = load_manifest(path)
    demos_file, offsets_file = path / manifest.files[DEMOS].name, path / manifest.files[OFFSETS].name
    original = demos_file.read_bytes()
    lines = original.split(b"\n")
    # a record broken in place (the offsets still frame it): found when that record is read, named by line
    lines[41] = lines[41].replace(b'"instruction 41"', b"41" + b" " * 14)  # same length: valid JSON, bad record
    demos_file.write_bytes(b"\n".join(lines))
    resync(path, DEMOS)
    _, _, mapped = load_index(path, mmap=True)
    assert mapped[40].id == "40"
    with pytest.raises(IndexFormatError, match=rf"{demos_file.name}:42: invalid demo record"):
        mapped[41]
    with pytest.raises(IndexFormatError, match=rf"{demos_file.name}:42: invalid demo record"):
        load_index(path)  # an eager load parses every line at once
    demos_file.write_bytes(original)
    resync(path, DEMOS)
    # offsets that do not frame newline-ended records are refused at load
    table = np.frombuffer(offsets_file.read_bytes(), dtype="<u8").copy()
    table[10] += 3
    offsets_file.write_bytes(table.tobytes())
    resync(path, OFFSETS)
    with pytest.raises(IndexFormatError, match="does not give where each line"):
        load_index(path)
    offsets_file.write_bytes(table.tobytes())
    resync(path, OFFSETS)
    with pytest.raises(IndexFormatError, match=r":10: the offset table does not end this record at a newline"):
        load_index(path, mmap=True)
    offsets_file.write_bytes(table[:-1].tobytes())
    resync(path, OFFSETS)
    with pytest.raises(IndexFormatError, match="holds 299 offsets, manifest says 300 demos"):
        load_index(path, mmap=True)


def test_index_without_offsets_loads_mapped_with_records_in_memory(tmp_path: Path) -> None:
    """Indexes written before the offset table: their vectors map, their records are read whole."""
    path = write(tmp_path / "idx", "ivf", clustered())
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / manifest["files"].pop(OFFSETS)["name"]).unlink()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    _, index, demos = load_index(path, mmap=True)
    assert isinstance(demos, list) and len(demos) == index.ntotal == 3000


def test_cli_query_on_a_mapped_index(default_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picked = {}
    for flags in ([], ["--mmap"]):
        assert main(["query", str(default_index), "Write a haiku about rain.", "-k", "3", "--json", *flags]) == 0
        picked[bool(flags)] = [d["id"] for d in json.loads(capsys.readouterr().out)]
    assert picked[True] == picked[False] and len(picked[True]) == 3
