"""Every score is a cosine: IVF-PQ codebooks and codes forged to hijack rankings are refused at load, and the
scores of every index type (loaded into memory or memory-mapped) lie in [-1, 1] (icl_retriever.store.pq_codes,
icl_retriever.store.faiss_index.search / cosines)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import SMALL_INDEX_PARAMS, SYNTHETIC_CFG, clustered, resync

from icl_retriever import IndexFormatError, PIEEncoder, Retriever
from icl_retriever.records import Demo
from icl_retriever.store import (
    PQ_NORM_RANGE,
    SCORE_TOLERANCE,
    VECTORS,
    IndexParams,
    all_vectors,
    cosines,
    load_index,
    load_manifest,
    new_index,
    save_index,
    search,
    stored_vectors,
)
from icl_retriever.store.pq_codes import reconstruction_norms

CFG = SYNTHETIC_CFG
PARAMS = SMALL_INDEX_PARAMS
UNRELATED = ["Write a haiku about rain.", "Translate 'good night' into German.", "What is 17 times 3?",
             "Summarize the following paragraph in one sentence.", "Classify the sentiment of this review."]
HIJACKED = 7  # the demo a forger wants first


@pytest.fixture(scope="module")
def pq_pool(tmp_path_factory: pytest.TempPathFactory, default_index: Path, encoder: PIEEncoder) -> Path:
    """The default pool (385 real demos) as an IVF-PQ index with topic vectors."""
    exact = Retriever.from_index(default_index, encoder=encoder)
    out = tmp_path_factory.mktemp("pq") / "pq"
    index = new_index(all_vectors(exact.index), "ivfpq", IndexParams(nlist=4, nprobe=4))
    save_index(out, index, list(exact.demos), encoder_config=encoder.config, fingerprint=encoder.fingerprint,
               topic_index=exact.snapshot.topic, topic=exact.manifest.topic)
    return out


@pytest.fixture()
def pq_copy(pq_pool: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(pq_pool, tmp_path / "pq")
    return tmp_path / "pq"


def tamper(path: Path, edit: Callable[[faiss.IndexIVFPQ], None]) -> None:
    """Load the index, change it in memory, write it back and make the manifest vouch for it (a forger)."""
    _, index, _ = load_index(path)
    edit(index)
    (path / load_manifest(path).files[VECTORS].name).write_bytes(faiss.serialize_index(index).tobytes())
    resync(path)


def codebooks(index: faiss.IndexIVFPQ) -> np.ndarray:
    pq = index.pq
    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def set_codes(index: faiss.IndexIVFPQ, row: int, codes: np.ndarray) -> None:
    """Give stored vector ``row`` the codes ``codes`` (one per sub-quantiser), where its list keeps them."""
    where = int(index.direct_map.get(row))
    code = np.ascontiguousarray(codes, dtype=np.uint8)
    index.invlists.update_entry(where >> 32, where & 0xFFFFFFFF, row, faiss.swig_ptr(code))


def mean_direction(index: faiss.IndexIVFPQ) -> np.ndarray:
    """The mean direction of the stored vectors, cut into sub-quantiser pieces of unit norm."""
    pq = index.pq
    pieces = all_vectors(index).mean(axis=0).reshape(pq.M, pq.dsub)
    return pieces / np.linalg.norm(pieces, axis=1, keepdims=True)


def push_one_centroid(index: faiss.IndexIVFPQ) -> None:
    """The issue's attack: code 0 of every codebook at norm 1.99 along the mean direction (under the old
    per-centroid bound of 2), and one demo given that code everywhere."""
    centroids = codebooks(index).copy()
    centroids[:, 0] = 1.99 * mean_direction(index)
    faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
    set_codes(index, HIJACKED, np.zeros(index.pq.M))


def scale_all_centroids(index: faiss.IndexIVFPQ) -> None:
    faiss.copy_array_to_vector((3 * codebooks(index)).ravel(), index.pq.centroids)


def codes_only(index: faiss.IndexIVFPQ) -> None:
    """No centroid changed: one demo's codes each pick the honest centroid most along the mean direction."""
    best = np.einsum("mkd,md->mk", codebooks(index), mean_direction(index)).argmax(axis=1)
    set_codes(index, HIJACKED, best)


@pytest.mark.parametrize("attack", [push_one_centroid, scale_all_centroids, codes_only])
def test_pq_reconstructions_that_cannot_be_unit_vectors_are_refused(pq_copy: Path, attack) -> None:  # type: ignore[no-untyped-def]
    tamper(pq_copy, attack)
    for mmap in (False, True):
        for verify in (True, False):  # a content check, not a checksum
            with pytest.raises(IndexFormatError, match=r"\.faiss: the code of stored vector \d+ reconstructs to norm"):
                load_index(pq_copy, mmap=mmap, verify=verify)


def test_the_hijack_would_win_unrelated_queries(pq_copy: Path, encoder: PIEEncoder) -> None:
    """What the load check stops: FAISS's own scores of the forged index put the demo first with a 'cosine' far
    above 1; the same index read without the check and searched through the library gives cosines."""
    _, index, _ = load_index(pq_copy)
    push_one_centroid(index)
    queries = encoder.encode(UNRELATED)
    raw, ids = index.search(queries, 1)
    assert (ids[:, 0] == HIJACKED).all() and (raw[:, 0] > 3).all()
    scores, ids = search(index, queries, 10)
    assert (np.abs(scores) <= 1 + SCORE_TOLERANCE).all()


def test_reconstruction_norms_match_decoded_vectors(pq_pool: Path) -> None:
    """The norms computed from per-cluster tables are those of the decoded vectors, for every stored code."""
    for mmap in (False, True):
        _, index, _ = load_index(pq_pool, mmap=mmap)
        ids, norms = (np.concatenate(part) for part in zip(*reconstruction_norms(index), strict=True))
        assert sorted(ids) == list(range(index.ntotal))
        decoded = np.linalg.norm(index.reconstruct_n(0, index.ntotal)[ids], axis=1)  # raw, not normalised
        np.testing.assert_allclose(norms, decoded, atol=1e-5)
        assert PQ_NORM_RANGE[0] < norms.min() and norms.max() < PQ_NORM_RANGE[1]


def test_writer_refuses_a_pq_index_the_loader_would_refuse(pq_pool: Path, tmp_path: Path) -> None:
    _, index, demos = load_index(pq_pool)
    push_one_centroid(index)
    with pytest.raises(ValueError, match="vectors vector .* has norm"):
        save_index(tmp_path / "out", index, list(demos), encoder_config=CFG, fingerprint="f")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("mmap", [False, True], ids=["memory", "mmap"])
def test_scores_are_cosines_for_every_index_type(tmp_path: Path, kind: str, mmap: bool) -> None:
    """search and cosines agree, every score in [-1, 1], best first; IVF-PQ's are cosines with the
    reconstructions, not FAISS's inner products with them."""
    x = clustered()
    save_index(tmp_path / "idx", new_index(x, kind, PARAMS[kind]), [Demo(id=str(i), instruction="x") for i in range(len(x))],  # type: ignore[arg-type]
               encoder_config=CFG, fingerprint="f")
    _, index, _ = load_index(tmp_path / "idx", mmap=mmap)
    queries = x[:40] + np.random.default_rng(1).standard_normal((40, x.shape[1])).astype(np.float32)
    faiss.normalize_L2(queries)
    for batch in (queries, queries[:1]):  # many queries, and the one-thread path of a single one
        scores, ids = search(index, batch, 20)
        assert (ids >= 0).all() and (np.abs(scores) <= 1 + SCORE_TOLERANCE).all()
        assert (np.diff(scores, axis=1) <= 0).all()
        for q, row_ids, row_scores in zip(batch, ids, scores, strict=True):
            np.testing.assert_allclose(cosines(index, row_ids, q), row_scores, atol=1e-5)
    unit = stored_vectors(index, np.arange(100))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-3)
    if kind == "ivfpq":  # inner products with reconstructions (what FAISS ranks by) are not cosines
        inner = index.reconstruct_batch(ids[0]) @ queries[0]
        assert np.abs(inner - scores[0]).max() > 1e-3


def test_retriever_scores_on_a_pq_index_are_cosines(pq_pool: Path, encoder: PIEEncoder) -> None:
    """Through get_demos, on every path (one search, a filter searched exactly, MMR, min_score), mapped."""
    r = Retriever.from_index(pq_pool, encoder=encoder, mmap=True)
    for query in UNRELATED:
        plain = r.get_demos(query, k=5, rerank=None)
        assert all(-1 <= d.score <= 1 + SCORE_TOLERANCE for d in plain)
        task = plain[0].metadata["task"]
        filtered = r.get_demos(query, k=3, rerank=None, filter={"task": task})  # the exact path
        assert filtered[0].id == plain[0].id and filtered[0].score == pytest.approx(plain[0].score, abs=1e-5)
        floor = plain[2].score
        assert [d.id for d in r.get_demos(query, k=5, rerank=None, min_score=floor)] == [d.id for d in plain[:3]]
        assert all(-1 <= d.score <= 1 + SCORE_TOLERANCE for d in r.get_demos(query, k=5, diversity=0.5))


def test_an_index_changed_after_its_load_checks_is_an_error_not_a_clamp(tmp_path: Path) -> None:
    """A memory-mapped file rewritten in place after loading: the search refuses its scores."""
    x = clustered(n=500)
    path = tmp_path / "idx"
    save_index(path, new_index(x, "flat"), [Demo(id=str(i), instruction="x") for i in range(len(x))],
               encoder_config=CFG, fingerprint="f")
    _, index, _ = load_index(path, mmap=True)
    assert (np.abs(search(index, x[:5], 3)[0]) <= 1 + SCORE_TOLERANCE).all()
    file = path / load_manifest(path).files[VECTORS].name
    data = bytearray(file.read_bytes())
    header = len(data) - 4 * x.size
    data[header : header + 4 * x.shape[1]] = (50 * x[0]).tobytes()  # row 0 scaled x50, in place
    with open(file, "r+b") as fh:
        fh.write(data)
    with pytest.raises(IndexFormatError, match="search score of .* is not a cosine"):
        search(index, x[:1], 3)
