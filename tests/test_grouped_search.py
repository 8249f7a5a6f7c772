"""Retriever.get_demos_grouped (what a server's micro-batch calls) and Retriever.get_messages."""

from __future__ import annotations

import pytest

from icl_retriever import Retriever
from icl_retriever.messages import demo_messages
from icl_retriever.query_vectors import query_batch_size
from icl_retriever.search import SearchControls

QUERIES = ["Translate 'good night' into German.", "Write a limerick about a cat.", "Convert 3 feet to meters.",
           "Write a SQL query that lists customers from Spain.", "Is this review positive? 'Great phone.'"]


def test_groups_with_their_own_controls_equal_get_demos_batch(default_retriever: Retriever) -> None:
    groups = [
        (QUERIES[:2], SearchControls.parse(k=3)),
        (QUERIES[2:3], SearchControls.parse(k=2, rerank=None, min_score=0.1)),
        ([], SearchControls.parse(k=4)),
        (QUERIES[3:], SearchControls.parse(k=5, diversity=0.4, filter={"task": ["sql_query", "sentiment"]})),
    ]
    got = default_retriever.get_demos_grouped(groups)
    assert len(got) == len(groups)
    for (queries, ctl), answers in zip(groups, got, strict=True):
        controls = ctl.model_dump(exclude={"k"}, exclude_defaults=True)
        expected = default_retriever.get_demos_batch(queries, k=ctl.k, **controls)
        assert [[d.id for d in a] for a in answers] == [[d.id for d in e] for e in expected]
        for a, e in zip(answers, expected, strict=True):
            assert [d.score for d in a] == pytest.approx([d.score for d in e], abs=1e-5)


def test_grouped_refuses_what_get_demos_refuses(default_retriever: Retriever) -> None:
    with pytest.raises(ValueError, match="query 0 is empty"):
        default_retriever.get_demos_grouped([([" "], SearchControls.parse(k=1))])
    with pytest.raises(TypeError, match="group 0"):
        default_retriever.get_demos_grouped([("a query, not a list", SearchControls.parse(k=1))])  # type: ignore[list-item]


def test_get_messages_alternates_user_and_assistant_turns(default_retriever: Retriever) -> None:
    demos = default_retriever.get_demos(QUERIES[0], k=3, rerank=None)
    messages = default_retriever.get_messages(QUERIES[0], k=3, rerank=None)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    for demo, user, assistant in zip(demos, messages[::2], messages[1::2], strict=True):
        assert user["content"] == (f"{demo.instruction}\n\n{demo.input}" if demo.input else demo.instruction)
        assert assistant["content"] == demo.output
    assert demo_messages([]) == []


def test_query_batches_are_cut_into_length_sorted_chunks() -> None:
    assert [query_batch_size(n) for n in (1, 3, 4, 8, 16, 64, 1000)] == [1, 1, 1, 2, 4, 16, 16]
    assert query_batch_size(1000, 32) == 32
