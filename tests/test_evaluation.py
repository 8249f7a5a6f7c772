"""Evaluation: metric functions on hand-made embeddings, file loading, and evaluate() with the real encoder."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from icl_retriever import PIEEncoder, PoolError
from icl_retriever.evaluation import (
    EvalReport,
    cross_group_hits,
    cross_group_precision,
    evaluate,
    load_grouped,
    load_pool_labels,
    ict_scores,
    iis_spearman,
    load_ict,
    load_iis,
    paired_difference,
    retrieval_hits,
    retrieval_precision,
    twin_count,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_IEB = FIXTURES / "tiny_ieb.json"
TINY_SNI = FIXTURES / "tiny_sni.json"
DEFAULT_POOL = Path(__file__).resolve().parents[1] / "examples" / "demos.jsonl"
SNI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sni"
IEB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ieb"
needs_ieb = pytest.mark.skipif(not IEB.exists(), reason="needs ../shared/data/ieb")


# -------------------------------------------------------------------------------- retrieval_precision

# Samples 0 and 1 have the same text (up to whitespace) but different labels; each is the other's
# nearest neighbour, so counting twins would change P@1 from 0.6 to 0.4.
TWIN_X = np.array(
    [[1.0, 0.0, 0.0], [0.99, 0.141, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.0, 0.1, 0.995]], dtype=np.float32
)
TWIN_LABELS = ["A", "B", "A", "B", "B"]
TWIN_TEXTS = ["Write a poem.", " Write a poem.\n", "Compose verse.", "Count rows.", "Sum rows."]


def test_retrieval_precision_excludes_identical_texts() -> None:
    precision = retrieval_precision(TWIN_X, TWIN_LABELS, TWIN_TEXTS, ks=(1, 2))
    # Nearest allowed neighbours: 0->2 (A), 1->2 (A), 2->1 (B), 3->4 (B), 4->3 (B); every query's top 2 holds one hit.
    assert precision == pytest.approx({1: 0.6, 2: 0.5})


def test_retrieval_precision_uses_twins_when_texts_differ() -> None:
    distinct = [f"text {i}" for i in range(len(TWIN_TEXTS))]
    assert retrieval_precision(TWIN_X, TWIN_LABELS, distinct, ks=(1,))[1] == pytest.approx(0.4)


def test_retrieval_precision_counts_missing_neighbours_as_misses() -> None:
    # Samples 0 and 1 have 3 candidates each (self and twin excluded), so their 4th neighbour is a miss:
    # hits per query are 1, 2, 1, 2, 2 out of k = 4.
    assert retrieval_precision(TWIN_X, TWIN_LABELS, TWIN_TEXTS, ks=(4,))[4] == pytest.approx(8 / 20)
    assert retrieval_precision(TWIN_X[:1], TWIN_LABELS[:1], TWIN_TEXTS[:1], ks=(1,))[1] == 0.0


def test_retrieval_precision_is_block_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 8)).astype(np.float32)
    labels = [str(i % 5) for i in range(50)]
    texts = [f"t{i % 45}" for i in range(50)]  # a few twins
    whole = retrieval_precision(X, labels, texts)
    monkeypatch.setattr("icl_retriever.evaluation._BLOCK", 7)
    assert retrieval_precision(X, labels, texts) == pytest.approx(whole)


def test_retrieval_precision_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        retrieval_precision(TWIN_X, TWIN_LABELS[:-1], TWIN_TEXTS)


def test_twin_count_ignores_surrounding_whitespace() -> None:
    assert twin_count(TWIN_TEXTS) == 2
    assert twin_count(["a", "b", "a", "a"]) == 3


# ------------------------------------------------------------------------------- ict / iis metrics


def test_ict_scores_perfect_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    X = np.concatenate([c + 0.01 * rng.normal(size=(6, 16)) for c in centres]).astype(np.float32)
    labels = [f"task{i}" for i in range(4) for _ in range(6)]
    scores = ict_scores(X, labels)
    assert scores == pytest.approx({"ari": 1.0, "purity": 1.0, "homogeneity": 1.0})


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_ict_scores_one_cluster_per_two_labels_halves_purity() -> None:
    X = np.repeat(np.eye(2, 4, dtype=np.float32), 4, axis=0)  # 2 distinct points, 4 labels
    labels = ["a", "a", "b", "b", "c", "c", "d", "d"]
    scores = ict_scores(X, labels)
    assert scores["purity"] == pytest.approx(0.5)
    assert scores["ari"] < 1.0


def test_iis_spearman_sign_follows_the_labels() -> None:
    X1 = np.tile([1.0, 0.0], (6, 1)).astype(np.float32)
    X2 = np.array([[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1]], dtype=np.float32)
    same = [1, 1, 1, 0, 0, 0]
    best = spearmanr(range(6), sorted(same)).statistic  # the maximum possible with tied 0/1 labels
    assert iis_spearman(X1, X2, same) == pytest.approx(best)
    assert iis_spearman(X1, X2, [1 - v for v in same]) == pytest.approx(-best)


# ------------------------------------------------------------------------------------------ files


def test_load_ict_reads_the_fixture() -> None:
    texts, labels = load_ict(TINY_IEB)
    assert len(texts) == len(labels) == 48
    assert len(set(labels)) == 8
    assert "translate|sentence##convert|sentence" in labels


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a non-empty JSON object"),
        ('{"a|b": {"samples": [{"category": ["a", "b"]}]}}', 'missing or empty "instruction"'),
        ('{"a|b": [1, 2]}', 'expected an object with a "samples" list'),
    ],
)
def test_load_ict_names_file_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PoolError, match=message) as info:
        load_ict(path)
    assert str(path) in str(info.value)


def test_load_ict_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="no such file"):
        load_ict(tmp_path / "absent.json")


def test_load_iis_validates_labels(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction1": "a", "instruction2": "b", "label": 2}]), encoding="utf-8")
    with pytest.raises(PoolError, match="item 0") as info:
        load_iis(path)
    assert info.value.path == str(path)
    path.write_text(json.dumps([{"instruction1": "a", "instruction2": "b", "label": 1}]), encoding="utf-8")
    with pytest.raises(PoolError, match="both labels"):
        load_iis(path)


# --------------------------------------------------------------------------------------- evaluate


def _iis_file(tmp_path: Path) -> Path:
    """Pairs from the tiny fixture: same task -> 1, different task -> 0."""
    data = json.loads(TINY_IEB.read_text(encoding="utf-8"))
    groups = [[s["instruction"] for s in v["samples"]] for v in data.values()]
    pairs = [{"instruction1": g[0], "instruction2": g[1], "label": 1} for g in groups]
    pairs += [{"instruction1": a[2], "instruction2": b[3], "label": 0} for a, b in itertools.pairwise(groups)]
    path = tmp_path / "iis.json"
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return path


def test_evaluate_on_the_tiny_fixture(encoder: PIEEncoder, tmp_path: Path) -> None:
    report = evaluate(encoder, TINY_IEB, _iis_file(tmp_path), show_progress_bar=False)
    assert (report.n_samples, report.n_labels, report.n_pairs, report.n_twins_excluded) == (48, 8, 15, 0)
    for value in (report.ari, report.purity, report.homogeneity, report.p_at_1, report.p_at_4):
        assert value is not None and 0.0 <= value <= 1.0
    assert report.p_at_1 is not None and report.p_at_1 > 0.5  # the untrained base already groups these
    assert report.iis_spearman is not None and report.iis_spearman > 0
    assert report.primary == report.p_at_1
    table = report.table()
    assert "P@1" in table and "identical" in table and "IIS Spearman" in table


def test_evaluate_needs_a_file(encoder: PIEEncoder) -> None:
    with pytest.raises(ValueError, match="ict_path"):
        evaluate(encoder)


def test_report_table_without_ict() -> None:
    report = EvalReport(model="m", iis_spearman=0.5, n_pairs=10)
    assert report.primary is None
    assert "P@1" not in report.table() and "0.5000" in report.table()


@needs_ieb
def test_ieb_test_files_load() -> None:
    texts, labels = load_ict(IEB / "eft_test.json")
    assert (len(texts), len(set(labels))) == (3291, 145)
    assert twin_count(texts) > 0
    pairs = load_iis(IEB / "intention_similarity_test.json")
    assert len(pairs) == 2496 and {p[2] for p in pairs} == {0, 1}


def test_iis_ceiling_is_reached_by_a_perfect_tie_free_score() -> None:
    from scipy.stats import spearmanr

    from icl_retriever.evaluation import iis_ceiling

    labels = np.array([1] * 60 + [0] * 40)
    perfect = labels + np.linspace(0, 0.5, 100)  # every positive above every negative, no ties
    assert iis_ceiling(labels) == pytest.approx(np.sqrt(3 * 0.6 * 0.4))
    assert spearmanr(perfect, labels).statistic == pytest.approx(iis_ceiling(labels), abs=1e-3)  # finite n


# ------------------------------------------------------------------------------ cross-group and pool


def test_cross_group_precision_looks_only_at_other_groups() -> None:
    # 0 and 1 share a group and a label; across groups 0 -> 2 (same label),
    # 1 -> 3 (other label); 2 and 3 look back at 0 and 1. Label "C" lives in one group only: not counted.
    X = np.array([[1, 0, 0], [0.5, 0.85, 0], [0.9, 0, 0.4], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    labels, groups = ["A", "A", "A", "B", "C"], ["g1", "g1", "g2", "g2", "g3"]
    p_at_1, n = cross_group_precision(X, labels, groups)
    assert n == 3  # the three A samples: A exists in g1 and g2; B and C in one group each
    # 0 -> 2 (A) hit; 1 -> 3 (B) miss; 2 -> 0 (A) hit.
    assert p_at_1 == pytest.approx(2 / 3)
    assert cross_group_precision(X[:2], labels[:2], groups[:2]) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_per_query_hits_are_what_the_precisions_average() -> None:
    X = np.array([[1, 0, 0], [0.5, 0.85, 0], [0.9, 0, 0.4], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    labels, groups = ["A", "A", "A", "B", "C"], ["g1", "g1", "g2", "g2", "g3"]
    assert cross_group_hits(X, labels, groups).tolist() == [True, False, True]
    assert cross_group_hits(X[:2], labels[:2], groups[:2]).tolist() == []
    hits = retrieval_hits(TWIN_X, TWIN_LABELS, TWIN_TEXTS, k=4)
    assert hits.shape == (len(TWIN_X), 4)
    assert hits[:, 0].mean() == pytest.approx(retrieval_precision(TWIN_X, TWIN_LABELS, TWIN_TEXTS, ks=(1,))[1])
    assert hits.sum(axis=1).mean() / 4 == pytest.approx(retrieval_precision(TWIN_X, TWIN_LABELS, TWIN_TEXTS, ks=(4,))[4])


def test_paired_difference_counts_only_disagreements() -> None:
    a = {"x": np.array([1, 1, 0, 0]), "y": np.array([1, 0])}
    b = {"x": np.array([1, 1, 1, 0]), "y": np.array([1, 0])}
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx((0.25 + 0.0) / 2)  # the mean over sets of the per-set mean differences
    assert se == pytest.approx(np.sqrt(np.var([0, 0, 1, 0], ddof=1) / 4) / 2)
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same non-empty sets"):
        paired_difference(a, {"x": b["x"]})
    with pytest.raises(ValueError, match="set 'y'"):
        paired_difference(a, {"x": b["x"], "y": np.array([1, 0, 1])})


def test_load_grouped_and_pool_labels(tmp_path: Path) -> None:
    texts, labels, groups = load_grouped(TINY_SNI)
    assert len(texts) == len(labels) == len(groups) == 11 and "europarl" in groups
    with pytest.raises(PoolError, match="dataset"):
        load_grouped(TINY_IEB)
    texts, labels = load_pool_labels(DEFAULT_POOL, "task")
    assert (len(texts), len(set(labels))) == (385, 77)
    with pytest.raises(PoolError, match="no metadata field 'nope'"):
        load_pool_labels(DEFAULT_POOL, "nope")


def test_evaluate_cross_group_and_pool(encoder: PIEEncoder) -> None:
    report = evaluate(encoder, cross_group_path=TINY_SNI, pool_path=DEFAULT_POOL, show_progress_bar=False)
    assert report.n_cross_group_queries == 10 and report.n_groups == 9  # every label but Title Generation
    assert report.cross_group_p_at_1 is not None and 0 <= report.cross_group_p_at_1 <= 1
    assert (report.n_pool, report.n_pool_labels) == (385, 77)
    assert report.pool_p_at_1 is not None and report.pool_p_at_4 is not None
    assert report.files == {"cross_group": str(TINY_SNI), "pool": str(DEFAULT_POOL)}
    table = report.table()
    assert "cross-group P@1" in table and "pool P@1" in table and "ICT" not in table


@pytest.mark.skipif(not SNI.is_dir(), reason="needs ../shared/data/sni")
def test_sni_dev_loads() -> None:
    texts, labels, groups = load_grouped(SNI / "sni_dev.json")
    assert (len(texts), len(set(labels)), len(set(groups))) == (171, 40, 64)
