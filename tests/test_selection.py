"""Diverse data selection (icl_retriever.selection and the select command)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import PIEEncoder, build_index, load_pool
from icl_retriever.cli import main
from icl_retriever.selection import select_diverse, select_pool

from helpers import POOL


def clustered(clusters: int = 10, per: int = 20, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Unit vectors in tight, well-separated clusters, and each vector's cluster as its label."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:clusters]  # orthonormal: far apart
    x = np.repeat(centres, per, axis=0) + 0.05 * rng.normal(size=(clusters * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"t{i // per}" for i in range(clusters * per)]


@pytest.mark.parametrize("method", ["kmeans", "kcenter"])
def test_diverse_methods_cover_every_cluster(method: str) -> None:
    x, labels = clustered()
    rows = select_diverse(x, 10, method=method)
    assert len(set(rows.tolist())) == 10
    assert {labels[r] for r in rows} == set(labels)  # one pick in each of the 10 clusters
    random_rows = select_diverse(x, 10, method="random", seed=0)
    assert len({labels[r] for r in random_rows}) < 10  # the baseline leaves clusters out
    assert select_diverse(x, 10, method=method).tolist() == rows.tolist()  # deterministic


@pytest.mark.parametrize("method", ["kmeans", "kcenter", "random"])
def test_per_task_cap_bounds_picks_per_label(method: str) -> None:
    x, labels = clustered(clusters=4, per=10)
    labels = ["a" if i < 30 else "b" for i in range(40)]  # 'a' spans three clusters
    rows = select_diverse(x, 8, method=method, labels=labels, per_task_cap=4)
    picked = [labels[r] for r in rows]
    assert len(rows) == 8 and len(set(rows.tolist())) == 8
    assert picked.count("a") == 4 and picked.count("b") == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an integer from 1 to the 200"),
        ({"n": 201}, "n must be an integer from 1 to the 200"),
        ({"n": 5, "method": "dbscan"}, "method must be one of"),
        ({"n": 5, "per_task_cap": 1}, "per_task_cap needs labels"),
        ({"n": 11, "per_task_cap": 1, "labels": [f"t{i // 20}" for i in range(200)]}, "leaves 10 instructions"),
        ({"n": 5, "labels": ["a"]}, "1 labels for 200 vectors"),
    ],
)
def test_selection_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    x, _ = clustered()
    with pytest.raises(ValueError, match=message):
        select_diverse(x, **kwargs)


def test_select_command_from_a_pool_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    out = tmp_path / "picked.jsonl"
    assert main(["select", str(pool), "--n", "5", "--out", str(out), "--per-task-cap", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    picked = load_pool(out)
    assert len(picked) == 5 and report["labels_covered"] == 5 and report["labels_in_pool"] == 5
    assert {d.id for d in picked} <= {r["id"] for r in POOL}
    before = out.read_bytes()
    assert main(["select", str(pool), "--n", "3", "--out", str(out)]) == 2  # an existing file is kept
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["select", str(pool), "--n", "3", "--out", str(out), "--force", "--method", "kcenter"]) == 0
    assert "Selected 3 of 10 instructions (kcenter)" in capsys.readouterr().out and len(load_pool(out)) == 3
    assert main(["select", str(pool), "--n", "11", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_select_from_an_index_uses_its_stored_vectors(tmp_path: Path, encoder: PIEEncoder) -> None:
    index = tmp_path / "idx"
    build_index(POOL, index, encoder=encoder, topic=False)
    calls: list[int] = []
    original = encoder.encode

    def counting(texts, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return original(texts, **kw)

    encoder.encode = counting  # type: ignore[method-assign]
    try:
        result = select_pool(index, 5, encoder=encoder, per_task_cap=1)
    finally:
        del encoder.encode
    assert not calls  # nothing embedded again
    assert result.labels_covered == 5 and len(result.demos) == 5
