"""Long text costs what its kept part costs: text is cut to a character budget before it is tokenised
(the encoder, static topic vectors, the query cache, exclude_query, a build), and the cut is the token-level
one for ordinary text."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import POOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icl_retriever import PIEEncoder, Retriever, build_index
from icl_retriever.encoder import config as encoder_config
from icl_retriever.encoder.config import char_budget, cut_to_budget
from icl_retriever.encoder.static import StaticEmbedder
from icl_retriever.query_vectors import QueryVectors
from icl_retriever.search.filters import query_matcher

SENTENCE = "The committee met again on Tuesday and postponed the decision about the harbour. "
#: A query of about 5 MB.
HUGE = "Summarize the following report in two sentences: " + SENTENCE * 60_000


@pytest.fixture()
def tokenised(encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The lengths of every text the encoder tokenises (to cut it, and to embed it)."""
    seen: list[int] = []
    offsets, embed = encoder._offsets, encoder.embed

    def spy_offsets(texts: list[str]) -> Any:
        seen.extend(len(t) for t in texts)
        return offsets(texts)

    def spy_embed(prompts: list[str]) -> Any:
        seen.extend(len(p) for p in prompts)
        return embed(prompts)

    monkeypatch.setattr(encoder, "_offsets", spy_offsets)
    monkeypatch.setattr(encoder, "embed", spy_embed)
    yield seen


def test_a_huge_text_is_tokenised_only_up_to_its_char_budget(encoder: PIEEncoder, tokenised: list[int]) -> None:
    with pytest.warns(UserWarning, match="1 instruction"):
        huge = encoder.encode(HUGE, show_progress_bar=False)
    assert tokenised and max(tokenised) <= encoder.text_limit + len(encoder.config.template)
    with pytest.warns(UserWarning, match="1 instruction"):
        head = encoder.encode(HUGE[:20_000], show_progress_bar=False)
    np.testing.assert_array_equal(huge, head)  # the same tokens, the same vector


def test_text_limit_follows_the_token_budget(encoder: PIEEncoder) -> None:
    assert encoder.text_limit == char_budget(encoder._instruction_budget)
    short = PIEEncoder(max_length=32)
    assert short.text_limit < encoder.text_limit


_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzäöü0123456789", min_size=1, max_size=18)
_GAPS = st.sampled_from([" ", ", ", ". ", "\n", " - ", "  "])
_TEXTS = st.lists(st.tuples(_WORDS, _GAPS), min_size=1, max_size=400).map(lambda ws: "".join(w + g for w, g in ws))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXTS, min_size=1, max_size=4), budget=st.sampled_from([8, 16, 40]))
def test_the_char_cut_is_the_token_cut_for_ordinary_text(
    encoder: PIEEncoder, texts: list[str], budget: int
) -> None:
    """With the character budget or with none at all: the same texts out, the same number cut."""
    cut = cut_to_budget(texts, budget, encoder._offsets)
    unlimited = encoder_config.CHARS_PER_TOKEN
    try:
        encoder_config.CHARS_PER_TOKEN = 10**9
        whole = cut_to_budget(texts, budget, encoder._offsets)
    finally:
        encoder_config.CHARS_PER_TOKEN = unlimited
    assert cut == whole


def test_a_head_without_enough_words_is_cut_and_counted(encoder: PIEEncoder) -> None:
    """One word of a million letters, or a flood of blank space: the head is the cut, and it is said."""
    for text in ("x" * 1_000_000, "Add 2 and 3." + " " * 1_000_000 + "Then double it."):
        out, cut = cut_to_budget([text], 100, encoder._offsets)
        assert cut == 1 and len(out[0]) <= char_budget(100) and text.startswith(out[0])


def test_static_topic_vectors_read_only_the_head() -> None:
    embedder = StaticEmbedder("default-base")
    seen: list[int] = []
    real = embedder._tokenizer

    class Spy:
        def encode_batch(self, texts: list[str], **kw: Any) -> Any:
            seen.extend(len(t) for t in texts)
            return real.encode_batch(texts, **kw)

    embedder._tokenizer = Spy()  # type: ignore[assignment]
    huge = embedder.encode(HUGE)
    assert max(seen) <= embedder.text_limit
    embedder._tokenizer = real
    np.testing.assert_array_equal(huge, embedder.encode(HUGE[:20_000]))


def test_the_query_cache_keeps_only_what_decides_the_vector(encoder: PIEEncoder) -> None:
    queries = QueryVectors(cache_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = queries.embed(encoder, [HUGE], "pie")
        # another text with the same head is the same vector, and a hit
        again = queries.embed(encoder, [HUGE[: encoder.text_limit + 1] + "something else entirely"], "pie")
    np.testing.assert_array_equal(first, again)
    assert len(queries.cache) == 1
    assert max(len(text) for _, text in queries.cache._data) == encoder.text_limit + 1


def test_a_huge_query_through_the_retriever(default_retriever: Retriever, tokenised: list[int]) -> None:
    with pytest.warns(UserWarning, match="truncated"):
        demos = default_retriever.get_demos(HUGE, k=3, exclude_query=True)
    assert len(demos) == 3
    assert max(tokenised) <= default_retriever.encoder.text_limit + len(default_retriever.encoder.config.template)


def test_query_matcher_compares_a_long_query_once() -> None:
    from icl_retriever import Demo

    demo = Demo(id="a", instruction="Add.", input="1 + 1")
    assert query_matcher("  Add.\n 1 + 1 ")(demo) and query_matcher("Add.")(demo)
    assert not query_matcher(HUGE)(demo) and not query_matcher("Add")(demo)


def test_a_build_with_a_huge_instruction_keeps_it_whole(
    tmp_path: Path, encoder: PIEEncoder, tokenised: list[int]
) -> None:
    pool = tmp_path / "pool.jsonl"
    records = [*POOL[:4], {"id": "huge", "instruction": HUGE, "task": "summarize"}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.warns(UserWarning, match="truncated"):
        retriever = build_index(pool, tmp_path / "idx", encoder=encoder, topic=False)
    assert max(tokenised) <= encoder.text_limit + len(encoder.config.template)
    assert retriever.demos[-1].instruction == HUGE  # stored as given; only the embedding reads the head
    reopened = Retriever.from_index(tmp_path / "idx", encoder=encoder)
    assert reopened.demos[-1].instruction == HUGE


def test_max_tokens_counts_a_huge_demo_only_as_far_as_the_budget_needs(encoder: PIEEncoder) -> None:
    from icl_retriever.search.budget import count_within, pack_by_tokens, token_counter

    counter = token_counter(encoder.tokenizer)
    seen: list[int] = []

    def spy(texts: list[str]) -> list[int]:
        seen.extend(len(t) for t in texts)
        return counter(texts)

    texts = ["Add 2 and 3.\n5", HUGE, SENTENCE * 3, "x" * 50_000]
    counts = count_within(spy, texts, 200)
    assert counts[0] == counter([texts[0]])[0] and counts[2] == counter([texts[2]])[0]
    assert counts[1] > 200 and max(seen[:4]) <= char_budget(200)  # the huge one: its head, over the budget
    assert counts[3] == counter([texts[3]])[0]  # no blank in its head: counted whole, as before
    assert pack_by_tokens(counts, 200, 4) == pack_by_tokens(counter(texts), 200, 4) == [0, 2, 3]


def test_records_are_written_in_pieces_with_the_bytes_of_one_json_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long text is escaped a piece at a time (pieces of 7 characters here), and the line is byte for byte
    what json.dumps gives: quotes, backslashes, control characters and non-BMP characters across the cuts."""
    import json

    from icl_retriever import Demo, records
    from icl_retriever.store import demo_file

    monkeypatch.setattr(records, "PIECE_CHARS", 7)
    tricky = 'a"b\\c\nd\te\u2028f\U0001F600g' * 5
    demos = [
        Demo(id="x", instruction=tricky, input="short", output=tricky[::-1], metadata={"k": tricky, "n": [1, 2]}),
        Demo(id="y", instruction="plain", output=""),
    ]
    for demo in demos:
        pieces = list(demo_file.record_chunks(demo))
        line = b"".join(pieces)
        assert line == (json.dumps(demo.record(), ensure_ascii=False) + "\n").encode()
        assert demo_file.record_line(demo) == line
        assert Demo.model_validate_json(line) == demo
    assert len(list(demo_file.record_chunks(demos[0]))) > 20  # the long fields went in pieces
    # the content-hash id of a record without one is unchanged by hashing in pieces
    payload = json.dumps([tricky, "short", tricky[::-1]], ensure_ascii=False).encode()
    assert records.stable_id(tricky, "short", tricky[::-1]) == hashlib.sha256(payload).hexdigest()[:16]
