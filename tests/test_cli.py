"""The command line end to end, through a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

POOL_LINES = [
    {"id": "p1", "instruction": "Write a poem about the sea.", "output": "Waves...", "task": "poem"},
    {"id": "p2", "instruction": "Compose a poem about winter mornings.", "output": "Frost...", "task": "poem"},
    {"id": "f1", "instruction": "List three facts about the sea.", "output": "Salty...", "task": "facts"},
    {"id": "t1", "instruction": "Translate 'thank you' into German.", "output": "Danke", "task": "translate"},
]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "icl_retriever.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL_LINES), encoding="utf-8")
    return path


def test_build_query_info(tmp_path: Path, pool: Path) -> None:
    out = tmp_path / "idx"
    built = cli("build", pool, "--out", out, "--batch-size", "2")
    assert built.returncode == 0, built.stderr
    assert "Indexed 4 demos (3 tasks)" in built.stdout

    text = cli("query", out, "Write a poem about the desert.", "-k", "2")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("1. [") and "(poem)" in text.stdout.splitlines()[0]

    as_json = cli("query", out, "Translate 'good night' into German.", "-k", "1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    [top] = json.loads(as_json.stdout)
    assert top["id"] == "t1" and isinstance(top["score"], float)

    info = cli("info", out, "--json")
    assert info.returncode == 0
    assert json.loads(info.stdout)["count"] == 4
    assert "topic vectors  contextual (plain embedding of default-base)" in cli("info", out).stdout


def test_errors_are_one_line_with_nonzero_exit(tmp_path: Path, pool: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": "broken",\n', encoding="utf-8")
    res = cli("build", bad, "--out", tmp_path / "x")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0
    assert "bad.jsonl:2: invalid JSON" in res.stderr
    assert not (tmp_path / "x").exists()

    out = tmp_path / "idx"
    assert cli("build", pool, "--out", out).returncode == 0
    again = cli("build", pool, "--out", out)
    assert again.returncode == 1 and "--force" in again.stderr
    assert cli("build", pool, "--out", out, "--force").returncode == 0

    missing = cli("query", tmp_path / "nope", "hello")
    assert missing.returncode == 1 and "no such index directory" in missing.stderr

    bad_k = cli("query", out, "hello", "-k", "0")
    assert bad_k.returncode == 2 and "k must be" in bad_k.stderr


def test_add_and_remove(tmp_path: Path, pool: Path) -> None:
    out = tmp_path / "idx"
    assert cli("build", pool, "--out", out).returncode == 0
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "s1", "instruction": "Write a SQL query counting users.", "task": "sql"}) + "\n")
    added = cli("add", out, extra)
    assert added.returncode == 0, added.stderr
    assert "now holds 5" in added.stdout
    dup = cli("add", out, extra)
    assert dup.returncode == 1 and "already in the index: 's1'" in dup.stderr
    upserted = json.loads(cli("add", out, extra, "--upsert", "--json").stdout)
    assert upserted == {"index": str(out), "added": ["s1"], "demos": 5}
    top = json.loads(cli("query", out, "Write a SQL query listing orders.", "-k", "1", "--json").stdout)[0]
    assert top["id"] == "s1"
    removed = cli("remove", out, "--ids", "s1", "unknown")
    assert removed.returncode == 0 and "now holds 4" in removed.stdout and "unknown" in removed.stderr
    after = json.loads(cli("query", out, "Write a SQL query listing orders.", "-k", "10", "--json").stdout)
    assert "s1" not in [d["id"] for d in after]
    gone = json.loads(cli("remove", out, "--ids", after[0]["id"], "nope", "--json").stdout)
    assert gone == {"index": str(out), "removed": [after[0]["id"]], "not_found": ["nope"], "demos": 3}
    rebuilt = json.loads(cli("build", pool, "--out", out, "--force", "--json").stdout)
    assert rebuilt["demos"] == 4 and rebuilt["manifest"]["count"] == 4 and rebuilt["runtime"] in ("onnx", "torch")


def test_eval_several_notions_of_task_in_one_call(pool: Path) -> None:
    fixtures = Path(__file__).resolve().parent / "fixtures"
    result = cli("eval", "--ict", fixtures / "tiny_ieb.json", "--cross-group", fixtures / "tiny_sni.json",
                 "--pool", pool, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_labels"] == 8 and report["n_cross_group_queries"] == 10 and report["n_pool_labels"] == 3
    assert set(report["files"]) == {"ict", "cross_group", "pool"}
    missing = cli("eval")
    assert missing.returncode == 2 and "--cross-group" in missing.stderr


def test_train_on_a_labelled_pool_then_build_with_it(tmp_path: Path) -> None:
    pool = Path(__file__).resolve().parents[1] / "examples" / "demos.jsonl"
    model = tmp_path / "model"
    trained = cli("train", pool, "--label-field", "task", "--out", model, "--steps", "2", "--batch-size", "4",
                  "--eval-every", "1", "--distill", "1")
    assert trained.returncode == 0, trained.stderr
    assert "held-out validation: demos.p_at_1" in trained.stdout
    again = cli("train", pool, "--label-field", "task", "--out", tmp_path / "m2", "--steps", "1", "--batch-size", "4",
                "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["training_card"]["steps_done"] == 1
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in POOL_LINES), encoding="utf-8")
    refused = cli("build", small, "--out", tmp_path / "idx", "--model", model, "--topic", "static")
    assert refused.returncode != 0 and "static topic vectors are made for the trained presets" in refused.stderr
    assert not (tmp_path / "idx").exists()
    built = cli("build", small, "--out", tmp_path / "idx", "--model", model, "--no-topic")
    assert built.returncode == 0, built.stderr
    info = cli("info", tmp_path / "idx").stdout
    assert str(model) in info and "topic vectors  none (task order only)" in info


def test_demo_builds_the_packaged_pool_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`icl-retriever demo` needs no repository: the pool ships in the package, the index goes to a cache."""
    from icl_retriever.records import default_pool_path, load_pool

    pool = default_pool_path()
    assert pool.is_relative_to(Path(__import__("icl_retriever").__file__).parent)
    repo_copy = Path(__file__).resolve().parents[1] / "examples" / "demos.jsonl"
    assert repo_copy.read_bytes() == pool.read_bytes() and len(load_pool(pool)) == 385
    cache = tmp_path / "cache"
    monkeypatch.setenv("ICL_RETRIEVER_CACHE", str(cache))
    first = cli("demo", "Translate 'good night' into German.", "-k", "2")
    assert first.returncode == 0, first.stderr
    assert "Building the packaged pool" in first.stderr and "385 demos" in first.stdout
    assert "(translation_en_de)" in first.stdout.split("\n> ")[1].splitlines()[1]  # the first demo
    [index] = cache.glob("default-pool-*/")  # beside it: the index lock file, ONNX exports, digests
    again = cli("demo", "-k", "1")  # reused, and the four default requests
    assert again.returncode == 0, again.stderr
    assert "Building" not in again.stderr and again.stdout.count("\n> ") == 4
    as_json = json.loads(cli("demo", "Write a haiku about rain.", "-k", "2", "--json").stdout)
    assert as_json["demos"] == 385 and len(as_json["answers"][0]["demos"]) == 2
    # a damaged cache is rebuilt, and says so; an index the user named is never overwritten unasked
    next(index.glob("demos.*.jsonl")).write_text("{}\n", encoding="utf-8")
    repaired = cli("demo", "Write a haiku about rain.", "-k", "1")
    assert repaired.returncode == 0, repaired.stderr
    assert "unusable" in repaired.stderr and "rebuilding" in repaired.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    refused = cli("demo", "--index", mine, "-k", "1")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_train_has_a_flag_for_every_train_config_field() -> None:
    """The train flags are generated from TrainConfig: each field parses into the config unchanged."""
    from icl_retriever.cli import build_parser
    from icl_retriever.train_config import TrainConfig

    argv = ["train", "a.json", "b.json", "--out", "runs/x", "--mix", "1,2", "--val-file", "v.json", "--val-file", "w.json",
            "--no-freeze-embeddings", "--weight-decay", "0.2", "--max-grad-norm", "0.5", "--add-period", "--symmetric",
            "--no-dropout", "--hard-negative-facets", "verb", "--pooling", "cls", "--steps", "7"]
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    config = TrainConfig(**given)
    assert config.train_files == [Path("a.json"), Path("b.json")] and config.mix == [1.0, 2.0]
    assert config.val_files == [Path("v.json"), Path("w.json")] and config.output_dir == Path("runs/x")
    assert (config.freeze_embeddings, config.weight_decay, config.max_grad_norm) == (False, 0.2, 0.5)
    assert (config.add_period, config.symmetric, config.dropout) == (True, True, False)
    assert (config.hard_negative_facets, config.pooling, config.steps) == ("verb", "cls", 7)
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert set(TrainConfig.model_fields) <= flags
