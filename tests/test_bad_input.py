"""Bad input at the retriever's doors: each gets a clear error (or a warning) and wastes no work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl_retriever import PIEEncoder, PoolError, Retriever, build_index


def test_huge_query_is_truncated_with_a_warning(default_retriever: Retriever) -> None:
    query = "Translate this sentence into German: " + "the ocean is calm " * 6000  # ~100,000 characters
    assert len(query) >= 100_000
    with pytest.warns(UserWarning, match="truncated"):
        demos = default_retriever.get_demos(query, k=3)
    assert len(demos) == 3


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query(default_retriever: Retriever, query: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        default_retriever.get_demos(query)


def test_non_string_query(default_retriever: Retriever) -> None:
    with pytest.raises(TypeError, match="expected str"):
        default_retriever.get_demos(42)  # type: ignore[arg-type]


def test_bad_last_line_of_a_large_pool_fails_before_embedding(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = tmp_path / "big.jsonl"
    with pool.open("w", encoding="utf-8") as fh:
        for i in range(50_000):
            fh.write(json.dumps({"id": f"d{i}", "instruction": f"Write a poem about the number {i}."}) + "\n")
        fh.write('{"id": "last", "instruction": ["not", "a", "string"]}\n')

    def no_embedding(*_: object, **__: object) -> None:
        raise AssertionError("embedding started before the pool was validated")

    monkeypatch.setattr(PIEEncoder, "encode", no_embedding)
    with pytest.raises(PoolError, match=r"big\.jsonl:50001: field 'instruction' must be a string"):
        build_index(pool, tmp_path / "idx", encoder=encoder)
    assert not (tmp_path / "idx").exists()


def test_duplicate_ids_in_added_records(tmp_path: Path, encoder: PIEEncoder) -> None:
    r = build_index([{"id": "a", "instruction": "Write a poem."}], tmp_path / "idx", encoder=encoder)
    with pytest.raises(PoolError, match="duplicate id 'b'"):
        r.add([{"id": "b", "instruction": "Add 1 and 1."}, {"id": "b", "instruction": "Add 2 and 2."}])
    assert len(Retriever.from_index(tmp_path / "idx", encoder=encoder)) == 1
