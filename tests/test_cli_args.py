"""Every flag is checked before a model loads or anything is embedded, and a flag that would be ignored is
an error: one line, exit code 2, no model loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import POOL

from icl_retriever import PIEEncoder, build_index
from icl_retriever.cli import main
from icl_retriever.evaluation import evaluate
from icl_retriever.selection import select_pool


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(PIEEncoder, "__init__", refuse)


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    return path


def _refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nlist", "4"], r"nlist apply to ivf indexes; index_type 'auto' builds flat below 200,000 demos.*--index-type ivf"),
        (["--pq-m", "8"], r"pq_m apply to ivfpq indexes; index_type 'auto'"),
        (["--hnsw-m", "8"], r"M apply to hnsw indexes; index_type 'auto' builds a flat index for 10 demos.*--hnsw-m"),
        (["--ef-search", "40"], r"ef_search apply to hnsw indexes; index_type 'auto' builds a flat index"),
        (["--topic", "static", "--model", "some/model"], r"static topic vectors are made for the trained presets"),
        (["--engine", "ray", "--chunk-size", "5"], r"--chunk-size, --no-resume and --batch-size apply to a local build"),
        (["--engine", "ray", "--no-resume"], r"apply to a local build"),
        (["--engine", "ray", "--batch-size", "8"], r"apply to a local build"),
        (["--batch-size", "0"], r"batch_size must be an integer >= 1, got 0"),
    ],
)
def test_build_flags_that_would_be_ignored_are_refused_first(
    tmp_path: Path, pool: Path, no_model: None, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    _refused(["build", str(pool), "--out", str(tmp_path / "idx"), *flags], message, capsys)
    assert not (tmp_path / "idx").exists()


def test_build_index_refuses_parameters_auto_would_ignore(tmp_path: Path, encoder: PIEEncoder) -> None:
    from icl_retriever import IndexParams

    with pytest.raises(ValueError, match="nlist apply to ivf indexes; index_type 'auto'"):
        build_index(POOL, tmp_path / "a", encoder=encoder, index=IndexParams(nlist=4))
    with pytest.raises(ValueError, match="M apply to hnsw indexes; index_type 'auto' builds a flat index for 10"):
        build_index(POOL, tmp_path / "b", encoder=encoder, index=IndexParams(M=8))
    with pytest.raises(ValueError, match="batch_size, resume and wait apply to a local build"):
        build_index(POOL, tmp_path / "c", encoder=encoder, engine="ray", resume=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # only lock files


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n", "0"], r"n must be an integer >= 1, got 0"),
        (["--n", "-2"], r"n must be an integer >= 1, got -2"),
        (["--n", "11"], r"n must be an integer from 1 to the 10 instructions, got 11"),
        (["--n", "3", "--per-task-cap", "0"], r"per_task_cap must be an integer >= 1, got 0"),
        (["--n", "9", "--per-task-cap", "1"], r"per_task_cap 1 leaves 5 instructions to pick from, fewer than n=9"),
        (["--n", "3", "--batch-size", "0"], r"batch_size must be an integer >= 1, got 0"),
        (["--n", "3", "--engine", "ray", "--batch-size", "4"], r"batch_size applies to a local run"),
    ],
)
def test_select_checks_its_arguments_against_the_pool_before_embedding(
    tmp_path: Path, pool: Path, no_model: None, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    _refused(["select", str(pool), "--out", str(tmp_path / "picked.jsonl"), *flags], message, capsys)
    assert not (tmp_path / "picked.jsonl").exists()


def test_select_from_an_index_checks_n_against_its_manifest(
    default_index: Path, tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "picked.jsonl")
    _refused(["select", str(default_index), "--n", "386", "--out", out], r"from 1 to the 385 instructions, got 386", capsys)
    _refused(["select", str(default_index), "--n", "5", "--out", out, "--batch-size", "8"],
             r"stored vectors are used as they are", capsys)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        select_pool(default_index, 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "-k", "0"], r"k must be a positive integer, got 0"),
        (["demo", "   "], r"query 0 is empty"),
        (["query", "IDX", " "], r"query 0 is empty"),
        (["query", "IDX", "Write a poem.", "--demo-format", "{output}"], r"--demo-format is only used with --max-tokens"),
        (["query", "IDX", "Write a poem.", "--rerank", "none", "--rerank-weight", "0.3"],
         r"rerank_weight is only used with rerank='hybrid'"),
        (["query", "IDX", "Write a poem.", "--rerank", "hybrid", "--rerank-margin", "0.3"],
         r"rerank_margin is only used with rerank='task_then_topic'"),
        (["add", "IDX", "POOL", "--batch-size", "0"], r"batch_size must be an integer >= 1, got 0"),
        (["eval", "--ict", "POOL", "--label-field", "task"], r"--label-field names the label of a --pool's demos"),
        (["eval", "--pool", "POOL", "--batch-size", "-1"], r"batch_size must be an integer >= 1, got -1"),
    ],
)
def test_other_commands_check_flags_before_loading_a_model(
    tmp_path: Path, pool: Path, no_model: None, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    monkey_cache = tmp_path / "cache"  # demo must not build anything either
    argv = [str(tmp_path / "idx") if a == "IDX" else str(pool) if a == "POOL" else a for a in argv]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICL_RETRIEVER_CACHE", str(monkey_cache))
        _refused(argv, message, capsys)
    assert not monkey_cache.exists() or not any(monkey_cache.glob("default-pool-*"))


def test_eval_reads_every_file_before_the_model_loads(tmp_path: Path, pool: Path, no_model: None) -> None:
    """A malformed second file used to be found only after the first was embedded."""
    from icl_retriever import PoolError

    broken = tmp_path / "pairs.json"
    broken.write_text("[{\"not\": \"a pair\"}]", encoding="utf-8")
    with pytest.raises((PoolError, ValueError)):
        evaluate(lambda: PIEEncoder(), pool_path=pool, iis_path=broken)
