"""Pool parsing: the three formats, ids, metadata, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl_retriever import Demo, PoolError, load_pool
from icl_retriever.records import stable_id


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_metadata_and_ids(tmp_path: Path) -> None:
    pool = write(
        tmp_path / "p.jsonl",
        '{"id": "a", "instruction": "Write a poem.", "output": "Roses.", "task": "poem"}\n'
        "\n"
        '{"instruction": "Add 2 and 3.", "input": "", "output": "5", "metadata": {"task": "math"}, "lang": "en"}\n',
    )
    demos = load_pool(pool)
    assert [d.id for d in demos] == ["a", stable_id("Add 2 and 3.", "", "5")]
    assert demos[0].metadata == {"task": "poem"}
    assert demos[1].metadata == {"task": "math", "lang": "en"}
    assert load_pool(pool)[1].id == demos[1].id  # stable across loads


def test_json_list_and_ieb_formats(tmp_path: Path) -> None:
    alpaca = write(tmp_path / "a.json", json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi"}]))
    assert load_pool(alpaca)[0].instruction == "Say hi."
    ieb = {
        "write|poem": {"number": 1, "samples": [{"category": ["write", "poem"], "instruction": "Write a poem."}]},
        "add|number": {"number": 1, "samples": [{"category": ["add", "number"], "instruction": "Add 1 and 2."}]},
    }
    demos = load_pool(write(tmp_path / "i.json", json.dumps(ieb)))
    assert [d.metadata["task"] for d in demos] == ["write|poem", "add|number"]
    assert demos[0].metadata["category"] == ["write", "poem"]


def test_iterable_of_dicts_and_demos() -> None:
    demos = load_pool([{"instruction": "A."}, Demo(id="x", instruction="B.", score=0.3)])
    assert demos[1].id == "x" and demos[1].score is None


def test_identical_records_without_ids_get_distinct_stable_ids() -> None:
    demos = load_pool([{"instruction": "Same."}, {"instruction": "Same."}])
    assert demos[0].id != demos[1].id and demos[1].id.startswith(demos[0].id)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no records"),
        ("\n\n", "no records"),
        ('{"instruction": "ok"}\n{"instruction": "broken"\n', r"p\.jsonl:2: invalid JSON"),
        ('{"instruction": "ok"}\n[1, 2]\n', r"p\.jsonl:2: expected a JSON object"),
        ('{"instruction": "ok"}\n{"output": "x"}\n', r"p\.jsonl:2: record has no 'instruction'"),
        ('{"instruction": 5}\n', r"p\.jsonl:1: field 'instruction' must be a string"),
        ('{"instruction": "  "}\n', r"p\.jsonl:1: field 'instruction' is empty"),
        ('{"instruction": "a", "output": ["x"]}\n', r"p\.jsonl:1: field 'output' must be a string"),
        ('{"instruction": "a", "id": "d"}\n{"instruction": "b", "id": "d"}\n', r"p\.jsonl:2: duplicate id 'd'"),
    ],
)
def test_bad_pools_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PoolError, match=message):
        load_pool(write(tmp_path / "p.jsonl", text))


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    pool = write(tmp_path / "p.jsonl", b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(PoolError, match=r"p\.jsonl:2: not valid UTF-8"):
        load_pool(pool)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="no such file"):
        load_pool(tmp_path / "nope.jsonl")
    with pytest.raises(PoolError, match="is a directory"):
        load_pool(tmp_path)


def test_a_broken_json_document_is_reported_where_it_breaks(tmp_path: Path) -> None:
    records = [{"instruction": f"Task {i}.", "output": "ok"} for i in range(10)]
    text = json.dumps(records, indent=2).splitlines()
    assert text[28] == "  },"
    text[28] = "  }},"  # line 29 of a pretty-printed list: one brace too many
    with pytest.raises(PoolError, match=r"p\.json:29: invalid JSON \(Expecting ',' delimiter at column 4\)"):
        load_pool(write(tmp_path / "p.json", "\n".join(text)))
    ieb = json.dumps({"t": {"samples": records}}, indent=2).replace('"Task 3."', '"Task 3.",', 1)
    line = next(i for i, row in enumerate(ieb.splitlines(), start=1) if "Task 3." in row)
    with pytest.raises(PoolError, match=rf"i\.json:{line}: invalid JSON"):
        load_pool(write(tmp_path / "i.json", ieb))


def test_a_field_named_score_is_metadata_like_any_other(tmp_path: Path) -> None:
    [demo] = load_pool(write(tmp_path / "p.jsonl", '{"instruction": "Rate this.", "score": 4.5}\n'))
    assert demo.metadata == {"score": 4.5} and demo.score is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"instruction": "Write a poem \\ud83d"}', r"p\.jsonl:1: field 'instruction' is not valid UTF-8 text \(lone surrogate U\+D83D"),
        ('{"instruction": "ok", "output": "\\udcff"}', r"p\.jsonl:1: field 'output' is not valid UTF-8 text \(byte 0xff"),
        ('{"instruction": "ok", "id": "a\\ud800"}', r"p\.jsonl:1: field 'id' is not valid UTF-8"),
        ('{"instruction": "ok", "tags": ["x", "\\udfff"]}', r"p\.jsonl:1: metadata at tags\[1\] is not valid UTF-8"),
        ('{"instruction": "ok", "metadata": {"\\ud800": 1}}', r"p\.jsonl:1: metadata \(key '\\ud800'\) is not valid"),
    ],
)
def test_lone_surrogates_are_refused_at_their_line(tmp_path: Path, record: str, message: str) -> None:
    with pytest.raises(PoolError, match=message):
        load_pool(write(tmp_path / "p.jsonl", record + "\n"))
    with pytest.raises(PoolError, match=r"\(task 't', sample 1\): (field|metadata)"):
        load_pool(write(tmp_path / "p.json", json.dumps({"t": {"samples": [json.loads(record)]}})))
    # a valid pair (a whole emoji, however it is escaped) is text like any other
    assert load_pool([{"instruction": "Write a poem \ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16")}])
