"""The search package: every control alone (pure functions) and through a real index and its entry points."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icl_retriever import Demo, PIEEncoder, Retriever, build_index
import icl_retriever.search.candidates as search_candidates
from icl_retriever.search import find_candidates
from icl_retriever.search.ranking import (
    dedup_keep,
    DEFAULT_DEDUP_THRESHOLD,
    hybrid_order,
    mmr_order,
    task_then_topic_order,
)
from icl_retriever.search.controls import DEFAULT_RERANK, SearchControls
from icl_retriever.search.filters import is_query_itself, metadata_matches, MetadataIndex
from icl_retriever.search.budget import format_demo, pack_by_tokens, token_counter
from icl_retriever.topic import topic_text
from icl_retriever.store import TOPIC, all_vectors, load_manifest, new_index

LONG_STORY = " ".join(["Once upon a time a dragon guarded a mountain of gold and slept for a hundred years."] * 12)
POOL: list[dict[str, Any]] = [
    {"id": "de-1", "instruction": "Translate 'thank you' into German.", "output": "Danke.", "task": "translate", "lang": "de"},
    {"id": "de-2", "instruction": "Translate 'good morning' into German.", "output": "Guten Morgen.", "task": "translate",
     "lang": "de"},
    {"id": "fr-1", "instruction": "Translate 'thank you' into French.", "output": "Merci.", "task": "translate", "lang": "fr"},
    {"id": "es-1", "instruction": "Translate 'good night' into Spanish.", "output": "Buenas noches.", "task": "translate",
     "lang": "es"},
    {"id": "poem-sea", "instruction": "Write a poem about the sea.", "output": "Waves roll in.", "task": "poem",
     "tags": ["poem", "sea"]},
    {"id": "poem-sea-copy", "instruction": "Write a poem about the sea.", "output": "Waves roll in.", "task": "poem",
     "tags": ["poem", "sea"]},
    {"id": "poem-city", "instruction": "Compose a short poem about a busy city.", "output": "Lights hum.", "task": "poem",
     "tags": ["poem"]},
    {"id": "facts-sea", "instruction": "Tell me three facts about the sea.", "output": "It is salty.", "task": "facts"},
    {"id": "sum-meeting", "instruction": "Summarize the text below in one sentence.",
     "input": "The quarterly budget meeting ran two hours over because of the new office lease.",
     "output": "The budget meeting overran.", "task": "summarize"},
    {"id": "sum-football", "instruction": "Summarize the text below in one sentence.",
     "input": "The home team scored in extra time to win the cup final in front of a record crowd.",
     "output": "The home team won the final.", "task": "summarize"},
    {"id": "story-long", "instruction": "Write a story about a dragon.", "output": LONG_STORY, "task": "story"},
    {"id": "story-short", "instruction": "Write a very short story about a cat.", "output": "The cat napped. The end.",
     "task": "story"},
]


def words(text: str) -> int:
    """A deterministic tokenizer for tests: whitespace words."""
    return len(text.split())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("controls") / "idx"
    build_index(POOL, out, encoder=encoder)
    return out


@pytest.fixture(scope="module")
def r(index_dir: Path, encoder: PIEEncoder) -> Retriever:
    return Retriever.from_index(index_dir, encoder=encoder)


def ids(demos: list[Demo]) -> list[str]:
    return [d.id for d in demos]


# pure functions -------------------------------------------------------------------------------


def test_mmr_order() -> None:
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(12, 8)).astype(np.float32)
    cands /= np.linalg.norm(cands, axis=1, keepdims=True)
    q = cands[3] + 0.1 * cands[5]
    q /= np.linalg.norm(q)
    assert mmr_order(q, cands, 0.0) == list(np.argsort(-(cands @ q), kind="stable"))
    # two identical candidates: with diversity the copy is pushed back behind a different one
    twins = np.stack([cands[0], cands[0], cands[1]])
    q2 = cands[0]
    assert mmr_order(q2, twins, 0.0)[:2] == [0, 1]
    assert mmr_order(q2, twins, 0.6) == [0, 2, 1]
    assert mmr_order(q2, twins, 0.6, limit=2) == [0, 2]
    assert mmr_order(q2, twins[:0], 0.5) == []


def test_task_then_topic_order() -> None:
    task = np.array([0.90, 0.89, 0.88, 0.70, 0.60])
    topic = np.array([0.10, 0.50, 0.30, 0.99, 0.20])
    # within 0.03 of 0.90: rows 0, 1, 2 -> by topic 1, 2, 0; then 3, 4 by task score
    assert task_then_topic_order(task, topic, 0.03) == [1, 2, 0, 3, 4]
    assert task_then_topic_order(task, topic, 0.0) == [0, 1, 2, 3, 4]
    assert task_then_topic_order(task, topic, 1.0) == [3, 1, 2, 4, 0]


def test_hybrid_order() -> None:
    task = np.array([0.90, 0.89, 0.88, 0.70, 0.60])
    topic = np.array([0.10, 0.50, 0.30, 0.99, 0.20])
    assert hybrid_order(task, topic, 1.0) == [0, 1, 2, 3, 4]  # task only
    assert hybrid_order(task, topic, 0.0) == [3, 1, 2, 4, 0]  # content only
    # 0.5: 0.5, 0.695, 0.59, 0.845, 0.4 -> content lifts row 3 above the task's best
    assert hybrid_order(task, topic, 0.5) == [3, 1, 2, 0, 4]
    assert hybrid_order(task, np.array([0.5, 0.5, 0.5, 0.5, 0.5]), 0.5) == [0, 1, 2, 3, 4]  # ties: task score


def test_dedup_keep() -> None:
    a, b = np.eye(3, dtype=np.float32)[:2]
    near = (a + 0.05 * b) / np.linalg.norm(a + 0.05 * b)
    vectors = np.stack([a, b, a, near])
    assert dedup_keep(vectors, DEFAULT_DEDUP_THRESHOLD) == [0, 1]  # exact copy and near copy of row 0 dropped
    assert dedup_keep(vectors, 1.0) == [0, 1, 3]  # threshold 1: only exact duplicates go


def test_pack_by_tokens() -> None:
    assert pack_by_tokens([40, 100, 30, 50], budget=100, k=4) == [0, 2]  # 100 would overflow: skipped, 30 fits
    assert pack_by_tokens([10, 10, 10], budget=100, k=2) == [0, 1]
    assert pack_by_tokens([200], budget=100, k=3) == []


def test_metadata_filters_and_postings_agree() -> None:
    demos = [Demo(id=str(i), instruction="x", metadata=m) for i, m in enumerate(
        [{"task": "a", "lang": "en"}, {"task": "b", "lang": "de"}, {"task": "a", "tags": ["x", "y"]},
         {"task": "a", "lang": "de", "n": 1}, {"lang": None}, {"task": {"nested": 1}}]
    )]
    specs = [
        {"task": "a"}, {"lang": ["en", "de"]}, {"task": "a", "lang": "de"}, {"tags": "y"}, {"tags": ["z", "x"]},
        {"missing": "a"}, {"n": 1}, {"n": 1.0}, {"lang": None}, {"task": {"nested": 1}}, {"id": ["0", "5"]}, {},
    ]
    meta = MetadataIndex(demos)
    for spec in specs:
        expected = [i for i, d in enumerate(demos) if metadata_matches(d, spec)]
        assert meta.rows(spec).tolist() == expected, spec
    assert meta.rows({"lang": ["en", "de"]}).tolist() == [0, 1, 3]
    assert meta.rows({"tags": "y"}).tolist() == [2]
    assert meta.rows({"id": ["0", "5"]}).tolist() == [0, 5]


def test_controls_validation() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"diversity": 1.5}, "diversity must be a number from 0"),
        ({"diversity": True}, "diversity must be"),
        ({"rerank": "topic"}, "unknown rerank 'topic'"),
        ({"dedup": 0.0}, r"dedup must be True or a cosine threshold in \(0, 1\]"),
        ({"dedup": 1.5}, "dedup must be"),
        ({"fetch_k": 2, "k": 4}, r"fetch_k \(2\) must be at least k \(4\)"),
        ({"k": 0}, "k must be a positive integer"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"rerank": "task_then_topic", "diversity": 0.3}, "use one of them"),
        ({"filter": ["task"]}, "filter must be a mapping"),
        ({"filter": {"lang": []}}, "empty list matches nothing"),
        ({"exclude_query": "yes"}, "exclude_query must be True or False"),
        ({"tokenizer": words}, "tokenizer is only used with max_tokens"),
        ({"rerank_margin": -0.1}, "rerank_margin"),
        ({"rerank_weight": 1.5}, "rerank_weight must be the PIE weight from 0"),
        ({"rerank": "hybrid", "diversity": 0.3}, "use one of them"),
        ({"demo_format": "{instruction.foo}"}, r"field \{instruction\.foo\} is not a field name"),
        ({"demo_format": "{instruction[999]}"}, r"field \{instruction\[999\]\} is not a field name"),
        ({"demo_format": "{} {0}"}, r"field \{\} is not a field name"),
        ({"demo_format": "{instruction"}, r"demo_format '\{instruction': expected '\}'"),
        ({"demo_format": "Q: \ud800 {instruction}"}, "demo_format is not valid UTF-8 text"),
    ]
    for controls, message in bad:
        with pytest.raises(ValueError, match=message):
            SearchControls.parse(**{"k": 4, **controls})
    c = SearchControls.parse(k=4, dedup=True)
    assert c.dedup == DEFAULT_DEDUP_THRESHOLD and c.n_candidates == 20
    assert SearchControls.parse(k=3, rerank=None).n_candidates == 3
    assert SearchControls.parse(k=3).resolve(has_topic=False).n_candidates == 3
    assert SearchControls.parse(k=3).resolve(has_topic=True).n_candidates == 20  # the default ranking looks deeper
    assert SearchControls.parse(k=10, diversity=0.2, fetch_k=15).n_candidates == 15


def test_formatting_counting_and_query_identity(encoder: PIEEncoder) -> None:
    demo = Demo(id="d", instruction="Add.", input="1 + 1", output="2", metadata={"task": "math"})
    assert format_demo(demo) == "Add.\n1 + 1\n2"
    assert format_demo(demo.model_copy(update={"input": ""})) == "Add.\n2"
    assert format_demo(demo, "Q: {instruction} ({task})\nA: {output}") == "Q: Add. (math)\nA: 2"
    assert format_demo(demo, lambda d: d.output) == "2"
    with pytest.raises(ValueError, match="names field 'lang'"):
        format_demo(demo, "{lang}")
    for template in ("{instruction:d}", "{output!z}", "{task:{width}}"):  # caught when filled: still one line
        with pytest.raises(ValueError, match=r"demo_format .* on demo 'd'|names field 'width'"):
            format_demo(demo, template)
    assert token_counter(words)(["a b c", "d"]) == [3, 1]
    assert token_counter(encoder.tokenizer)(["hello world"]) == [2]  # no [CLS] / [SEP]

    class Tiktokenish:
        def encode(self, text: str) -> list[int]:
            return list(range(len(text)))

    assert token_counter(Tiktokenish())(["abcd"]) == [4]
    with pytest.raises(ValueError, match="tokenizer must be"):
        token_counter(42)
    assert is_query_itself(demo, "  Add. ") and is_query_itself(demo, "Add.\n1 + 1") and not is_query_itself(demo, "Add")
    assert topic_text(demo) == "Add.\n1 + 1"


# controls through a real index ----------------------------------------------------------------


def test_filter_refills_when_the_best_are_filtered_out(r: Retriever, monkeypatch: pytest.MonkeyPatch) -> None:
    query = "Write a poem about the ocean."
    plain = r.get_demos(query, k=3)
    assert not any(d.metadata["task"] == "translate" for d in plain)  # no translation among the best...
    vectors = r.encoder.encode(query)
    expected = sorted(
        (d for d in r.demos if d.metadata["task"] == "translate"),
        key=lambda d: -float(r.encoder.encode(d.instruction) @ vectors),
    )[:3]
    got = r.get_demos(query, k=3, filter={"task": "translate"}, rerank=None)  # ...so the search must go deeper
    assert ids(got) == ids(expected)
    # the same through over-fetching (the path for filters matching many demos) and through a callable
    monkeypatch.setattr(search_candidates, "EXACT_FILTER_MAX", 0)
    assert ids(r.get_demos(query, k=3, filter={"task": "translate"}, rerank=None)) == ids(expected)
    assert ids(r.get_demos(query, k=3, filter=lambda d: d.metadata["task"] == "translate", rerank=None)) == ids(expected)
    assert [d.score for d in got] == sorted((d.score for d in got), reverse=True)


def test_filter_membership_lists_and_exhaustion(r: Retriever) -> None:
    got = r.get_demos("Translate 'see you soon' into German.", k=10, filter={"lang": ["de", "fr"]})
    assert sorted(ids(got)) == ["de-1", "de-2", "fr-1"]  # the pool holds 3: all of them, no more
    assert ids(r.get_demos("Translate 'hi'.", k=4, filter={"lang": "es"})) == ["es-1"]
    assert r.get_demos("Translate 'hi'.", k=4, filter={"lang": "it"}) == []
    both = r.get_demos("Write a poem.", k=5, filter={"task": "poem", "tags": "sea"})  # keys AND, list field contains
    assert sorted(ids(both)) == ["poem-sea", "poem-sea-copy"]
    calls: list[str] = []

    def short_output(d: Demo) -> bool:
        calls.append(d.id)
        return len(d.output) < 10

    got = r.get_demos("Write a poem about the sea.", k=2, filter=short_output)
    assert len(got) == 2 and all(len(d.output) < 10 for d in got)
    assert len(calls) == len(set(calls))  # the predicate runs once per demo


def test_filter_on_hnsw_index(r: Retriever) -> None:
    hnsw = new_index(all_vectors(r.index), "hnsw")
    approx = Retriever(r.encoder, hnsw, r.demos)
    for spec in ({"task": "translate"}, {"lang": ["de", "fr"]}, lambda d: d.metadata["task"] == "translate"):
        assert ids(approx.get_demos("Write a poem about the ocean.", k=3, filter=spec)) == ids(
            r.get_demos("Write a poem about the ocean.", k=3, filter=spec, rerank=None)  # approx has no topic vectors
        )


def test_diversity(r: Retriever) -> None:
    query = "Write a poem about the sea."
    assert r.get_demos(query, k=4, diversity=0.0) == r.get_demos(query, k=4)
    plain = r.get_demos(query, k=2)
    assert sorted(ids(plain)) == ["poem-sea", "poem-sea-copy"]  # the copy comes right after the original
    diverse = r.get_demos(query, k=2, diversity=0.5, fetch_k=10)
    assert diverse[0].id == plain[0].id and diverse[1].id != "poem-sea-copy"
    # exactly MMR over the 10 best, with scores still the PIE cosine
    q = r.encoder.encode(query)
    top = r.get_demos(query, k=10)
    vecs = np.stack([r.index.reconstruct(r.demos.index(next(x for x in r.demos if x.id == d.id))) for d in top])
    assert ids(diverse) == [top[i].id for i in mmr_order(q, vecs, 0.5, limit=2)]
    assert diverse[1].score == pytest.approx(float(vecs[mmr_order(q, vecs, 0.5)[1]] @ q), abs=1e-5)


def test_dedup_and_exclude_query(r: Retriever) -> None:
    query = "Write a poem about the sea."
    assert {"poem-sea", "poem-sea-copy"} <= set(ids(r.get_demos(query, k=3)))
    deduped = r.get_demos(query, k=3, dedup=True)
    assert len(deduped) == 3 and len({"poem-sea", "poem-sea-copy"} & set(ids(deduped))) == 1
    assert len(r.get_demos(query, k=3, dedup=0.99)) == 3
    excluded = r.get_demos(query, k=3, exclude_query=True)
    assert len(excluded) == 3 and not {"poem-sea", "poem-sea-copy"} & set(ids(excluded))
    # instruction + input as the query excludes that demo only, not its sibling with another input
    meeting = POOL[8]
    got = r.get_demos(f"{meeting['instruction']}\n{meeting['input']}", k=3, exclude_query=True)
    assert "sum-meeting" not in ids(got) and "sum-football" in ids(got)


def test_max_tokens_skips_an_overflowing_demo(r: Retriever) -> None:
    query = "Write a story about a knight."
    plain = r.get_demos(query, k=2)
    assert plain[0].id == "story-long"  # the best match is too long for the budget...
    packed = r.get_demos(query, k=2, max_tokens=60, tokenizer=words)
    assert "story-long" not in ids(packed) and "story-short" in ids(packed)  # ...a later, shorter one fits
    assert sum(words(format_demo(d)) for d in packed) <= 60
    roomy = r.get_demos(query, k=2, max_tokens=10_000, tokenizer=words)
    assert ids(roomy) == ids(plain)
    # the encoder's tokenizer by default; a template string formats what is counted
    default_count = r.get_demos(query, k=3, max_tokens=40)
    assert default_count and "story-long" not in ids(default_count)
    assert r.get_demos(query, k=3, max_tokens=1, tokenizer=words, demo_format="{instruction} {output}") == []
    assert ids(r.get_demos(query, k=1, max_tokens=5, tokenizer=words, demo_format="{output}")) == ["story-short"]


def test_rerank_task_then_topic(r: Retriever) -> None:
    query = "Summarize the text below in one sentence.\nThe visiting side equalised in the last minute of the derby."
    plain = r.get_demos(query, k=2)
    assert {d.metadata["task"] for d in plain} == {"summarize"}
    # both summaries have the same instruction, so the task scores tie; the content decides
    reranked = r.get_demos(query, k=2, rerank="task_then_topic")
    assert ids(reranked) == ["sum-football", "sum-meeting"]
    meeting_query = "Summarize the text below in one sentence.\nThe board meeting about the lease ran late again."
    assert ids(r.get_demos(meeting_query, k=1, rerank="task_then_topic")) == ["sum-meeting"]
    # margin 0 with tied scores still lets the content break the tie; a huge margin is pure topic order
    assert r.get_demos(query, k=4, rerank="task_then_topic", rerank_margin=2.0)[0].metadata["task"] == "summarize"


def test_rerank_hybrid(r: Retriever) -> None:
    query = "Summarize the text below in one sentence.\nThe visiting side equalised in the last minute of the derby."
    # tied task scores: the content decides; weight 1 is the PIE order, the scores stay PIE cosines
    assert ids(r.get_demos(query, k=2, rerank="hybrid")) == ["sum-football", "sum-meeting"]
    plain = r.get_demos(query, k=4, rerank=None)
    task_only = r.get_demos(query, k=4, rerank="hybrid", rerank_weight=1.0)
    assert [d.score for d in task_only] == pytest.approx([d.score for d in plain])
    content_only = r.get_demos(query, k=4, rerank="hybrid", rerank_weight=0.0)
    assert content_only[0].id == "sum-football"


def test_default_ranking_is_auto(r: Retriever) -> None:
    """rerank="auto" (the default) is DEFAULT_RERANK over an index with topic vectors; None is task order."""
    assert SearchControls.model_fields["rerank"].default == "auto"
    ctl = SearchControls.parse(k=2)
    assert ctl.rerank == "auto" and ctl.resolve(has_topic=True).rerank == DEFAULT_RERANK
    assert ctl.resolve(has_topic=False).rerank is None
    assert SearchControls.parse(k=2, diversity=0.3).resolve(has_topic=True).rerank is None  # MMR decides
    query = "Summarize the text below in one sentence.\nThe board meeting about the lease ran late again."
    assert ids(r.get_demos(query, k=2)) == ids(r.get_demos(query, k=2, rerank=DEFAULT_RERANK))
    task_order = r.get_demos(query, k=4, rerank=None)
    assert [d.score for d in task_order] == sorted((d.score for d in task_order), reverse=True)


def test_batch_equals_single_with_controls(r: Retriever) -> None:
    queries = ["Write a poem about the sea.", "Translate 'hello' into German.", "Write a story about a knight."]
    controls: list[dict[str, Any]] = [
        {},
        {"filter": {"task": ["poem", "translate"]}, "dedup": True},
        {"diversity": 0.4, "fetch_k": 8, "exclude_query": True},
        {"rerank": "task_then_topic", "max_tokens": 80, "tokenizer": words},
    ]
    for c in controls:
        batch = r.get_demos_batch(queries, k=3, **c)
        single = [r.get_demos(q, k=3, **c) for q in queries]
        assert [ids(x) for x in batch] == [ids(x) for x in single], c
        for b, s in zip(batch, single, strict=True):
            assert [d.score for d in b] == pytest.approx([d.score for d in s], abs=1e-5)


def test_query_embedding_cache(index_dir: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    original = encoder.encode

    def counting(texts: Any, **kwargs: Any) -> np.ndarray:
        seen.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    cached = Retriever.from_index(index_dir, encoder=encoder)
    first = cached.get_demos("Write a haiku.", k=2)
    assert cached.get_demos("Write a haiku.", k=2) == first
    assert seen == [["Write a haiku."]]
    cached.get_demos_batch(["Write a haiku.", "Translate 'yes'.", "Translate 'yes'."], k=1)
    assert seen[-1] == ["Translate 'yes'."]  # only the new query, once
    uncached = Retriever.from_index(index_dir, encoder=encoder, cache_size=0)
    seen.clear()
    uncached.get_demos("Write a haiku.", k=2)
    uncached.get_demos("Write a haiku.", k=2)
    assert len(seen) == 2
    small = Retriever.from_index(index_dir, encoder=encoder, cache_size=1)
    seen.clear()
    for q in ["A.", "B.", "A."]:
        small.get_demos(q, k=1)
    assert len(seen) == 3  # "A." was evicted by "B."


def test_topic_vectors_persist_and_follow_updates(tmp_path: Path, encoder: PIEEncoder) -> None:
    out = tmp_path / "idx"
    build_index(POOL[:4], out, encoder=encoder)
    manifest = load_manifest(out)
    assert manifest.topic is not None and TOPIC in manifest.files
    assert manifest.topic.source == "base_model" and manifest.topic.encoder.model == "default-base"
    r = Retriever.from_index(out, encoder=encoder)
    assert r.topic_index is not None and r.topic_index.ntotal == 4
    topic_encoder = r.topic_encoder()
    expected = topic_encoder.encode([topic_text(d) for d in r.demos])
    np.testing.assert_allclose(all_vectors(r.topic_index), expected, atol=1e-5)
    # the topic model is the base model: its vectors differ from the PIE ones
    assert not np.allclose(expected, all_vectors(r.index), atol=1e-2)

    r.add([POOL[8], POOL[9]])
    reopened = Retriever.from_index(out, encoder=encoder)
    assert reopened.topic_index is not None and reopened.topic_index.ntotal == 6
    row = [d.id for d in reopened.demos].index("sum-football")
    np.testing.assert_allclose(
        reopened.topic_index.reconstruct(row), topic_encoder.encode(topic_text(reopened.demos[row])), atol=1e-5
    )
    assert ids(reopened.get_demos("Summarize:\nThe striker scored twice.", k=1, rerank="task_then_topic")) == ["sum-football"]
    reopened.remove(["sum-football", "de-1"])
    again = Retriever.from_index(out, encoder=encoder)
    assert again.topic_index is not None and again.topic_index.ntotal == 4 == len(again)
    np.testing.assert_allclose(
        all_vectors(again.topic_index),
        topic_encoder.encode([topic_text(d) for d in again.demos]),
        atol=1e-5,
    )


def test_rerank_needs_topic_vectors(tmp_path: Path, encoder: PIEEncoder, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "idx"
    build_index(POOL[:6], out, encoder=encoder, topic=False)
    assert load_manifest(out).topic is None and sorted(load_manifest(out).files) == ["demos", "offsets", "vectors"]
    r = Retriever.from_index(out, encoder=encoder)
    with pytest.raises(ValueError, match="has no topic vectors.*rebuild it with topic vectors"):
        r.get_demos("Write a poem.", rerank="task_then_topic")
    with pytest.raises(ValueError, match="has no topic vectors"):
        r.get_demos("Write a poem.", rerank="hybrid")
    # the default ranking needs topic vectors: without them, task order, and the log says so once
    with caplog.at_level(logging.WARNING, logger="icl_retriever.retriever"):
        first = r.get_demos("Write a poem about the sea.", k=3)
        r.get_demos("Write a poem about the sea.", k=3)
    assert [m for m in caplog.messages if "no topic vectors" in m and "task similarity only" in m] == [caplog.messages[0]]
    assert len(caplog.messages) == 1
    assert ids(first) == ids(r.get_demos("Write a poem about the sea.", k=3, rerank=None))
    # dedup falls back to the instruction embeddings
    assert len({"poem-sea", "poem-sea-copy"} & set(ids(r.get_demos("Write a poem about the sea.", k=3, dedup=True)))) == 1
    r.add([POOL[7]])  # no topic vectors to keep in sync
    assert Retriever.from_index(out, encoder=encoder).topic_index is None
    with pytest.raises(ValueError, match="diversity must be"):
        r.get_demos("Write a poem.", diversity=-0.1)


def test_same_model_plain_topic_for_other_models(encoder: PIEEncoder) -> None:
    plain = encoder.with_template("plain")
    assert plain.model is encoder.model and plain.config.template == "{instruction}"
    assert plain.fingerprint != encoder.fingerprint
    np.testing.assert_allclose(plain.encode("Write a poem."), encoder.encode("Write a poem.", apply_template=False), atol=1e-6)


def test_langchain_controls_flow(index_dir: Path, encoder: PIEEncoder) -> None:
    from icl_retriever.langchain import PIEExampleSelector, PIERetriever

    lc = PIERetriever.from_index(index_dir, k=4, encoder=encoder, diversity=0.3, filter={"task": "translate"})
    docs = lc.invoke("Write a poem about the sea.", k=2)
    assert len(docs) == 2 and all(doc.metadata["task"] == "translate" for doc in docs)
    docs = lc.invoke("Write a poem about the sea.", search_kwargs={"filter": {"lang": "fr"}})
    assert [doc.id for doc in docs] == ["fr-1"]
    selector = PIEExampleSelector.from_index(index_dir, k=1, encoder=encoder, rerank="task_then_topic")
    query = "Summarize the text below in one sentence.\nThe goalkeeper saved a penalty in the final."
    assert selector.select_examples({"q": query})[0]["id"] == "sum-football"


def test_cli_query_flags(index_dir: Path) -> None:
    args = [
        sys.executable, "-m", "icl_retriever.cli", "query", str(index_dir), "Translate 'see you soon' into German.",
        "-k", "2", "--diversity", "0.3", "--fetch-k", "6", "--filter", "task=translate", "--filter", "lang=de,fr",
        "--dedup", "0.95", "--exclude-query", "--max-tokens", "300", "--json",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert len(got) == 2 and all(d["metadata"]["lang"] in ("de", "fr") for d in got)
    done = subprocess.run(
        [*args[:6], "--rerank", "task_then_topic", "--diversity", "0.2"],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 2 and "use one of them" in done.stderr


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_filter_on_approximate_index_finds_rare_matches(encoder: PIEEncoder, index_type: str) -> None:
    """A filter matching a few demos far from the query: over-fetching an approximate index at full depth
    does not return every demo, so the search goes exact over the matches instead of giving up."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    demos = [Demo(id=str(i), instruction=f"demo {i}", metadata={"rare": i % 1000 == 7}) for i in range(len(vectors))]
    approx = Retriever(encoder, new_index(vectors, index_type), demos)  # type: ignore[arg-type]
    query = vectors[0]
    rare = np.array([7, 1007, 2007])
    expected = rare[np.argsort(-(vectors[rare] @ query))].tolist()
    ctl = SearchControls.parse(k=3, filter=lambda d: d.metadata["rare"])
    rows, scores = find_candidates(approx.snapshot, "q", query, 3, ctl)
    assert rows.tolist() == expected
    np.testing.assert_allclose(scores, vectors[expected] @ query, atol=1e-5)
    ctl = SearchControls.parse(k=3, filter={"rare": True})
    assert find_candidates(approx.snapshot, "q", query, 3, ctl)[0].tolist() == expected


def test_every_search_control_is_reachable_from_every_entry_point(r: Retriever) -> None:
    """SearchControls is the one list of controls: get_demos / get_demos_batch (typed by SearchKwargs), the
    CLI's query command and the LangChain / DSPy components take exactly its fields, each documented (this
    fails when one of them misses a new control)."""
    import typing

    from icl_retriever.cli import build_parser
    from icl_retriever.langchain import check_search_kwargs
    from icl_retriever.search import SearchKwargs

    fields = set(SearchControls.model_fields)
    assert set(typing.get_type_hints(SearchKwargs)) == fields - {"k"}
    assert all(f.description for f in SearchControls.model_fields.values())
    query = build_parser()._subparsers._group_actions[0].choices["query"]
    assert fields <= {a.dest for a in query._actions}
    for name in fields - {"k"}:
        assert check_search_kwargs({name: None}) == {name: None}
    with pytest.raises(ValueError, match="unknown search control 'diversty'"):
        check_search_kwargs({"diversty": 0.5})
    with pytest.raises(ValueError, match="unknown search control 'diversty'"):
        r.get_demos("Write a poem.", diversty=0.5)  # type: ignore[call-arg]
    defaults = {name: f.default for name, f in SearchControls.model_fields.items() if name != "k"}
    assert ids(r.get_demos("Write a poem.", k=2, **defaults)) == ids(r.get_demos("Write a poem.", k=2))
