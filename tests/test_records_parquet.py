"""Parquet pools: one record per row, the same fields and rules as JSONL, errors that name file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl_retriever import PoolError, load_pool
from icl_retriever.records import load_pools

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [
    {"id": "a", "instruction": "Write a poem.", "input": None, "output": "Roses.", "task": "poem"},
    {"id": "b", "instruction": "Translate into German.", "input": "Good night.", "output": "Gute Nacht.",
     "task": "translate"},
]


def write_parquet(path: Path, rows: list[dict], **columns: object) -> Path:
    table = pa.Table.from_pylist(rows)
    for name, column in columns.items():
        table = table.append_column(name, column)
    pq.write_table(table, path, row_group_size=1)  # several row groups: rows are counted across them
    return path


def test_parquet_pool_reads_like_jsonl(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    parquet = write_parquet(tmp_path / "p.parquet", ROWS)
    assert load_pool(parquet) == load_pool(jsonl)
    assert load_pool(parquet)[1].metadata == {"task": "translate"} and load_pool(parquet)[0].input == ""
    # several files mix formats, ids unique across them
    other = tmp_path / "q.jsonl"
    other.write_text(json.dumps({"id": "c", "instruction": "Sum these."}) + "\n")
    assert [d.id for d in load_pools([other, parquet])] == ["c", "a", "b"]
    with pytest.raises(PoolError, match=r"p\.parquet \(row 1\): duplicate id 'a' \(first used at .*p\.jsonl:1\)"):
        load_pools([jsonl, parquet])


def test_parquet_metadata_column_as_struct_map_or_json(tmp_path: Path) -> None:
    rows = [{"instruction": "Write a poem."}, {"instruction": "Sum these."}]
    struct = pa.array([{"task": "poem", "n": 1}, {"task": "sum", "n": 2}])
    mapped = pa.array([[("task", "poem")], [("task", "sum")]], type=pa.map_(pa.string(), pa.string()))
    text = pa.array([json.dumps({"task": "poem"}), json.dumps({"task": "sum"})])
    for name, column in (("struct", struct), ("map", mapped), ("json", text)):
        demos = load_pool(write_parquet(tmp_path / f"{name}.parquet", rows, metadata=column))
        assert [d.metadata["task"] for d in demos] == ["poem", "sum"], name


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        ([{"instruction": "ok"}, {"instruction": None}], {}, r"\(row 2\): field 'instruction' must be a string"),
        ([{"instruction": "ok"}, {"instruction": " "}], {}, r"\(row 2\): field 'instruction' is empty"),
        ([{"output": "x"}], {}, r"no 'instruction' column \(the columns: 'output'\)"),
        ([{"instruction": "ok"}, {"instruction": "ok2"}], {"metadata": ["{}", "not json"]},
         r"\(row 2\): field 'metadata' is a string but not a JSON object"),
        ([{"instruction": "a", "id": "x"}, {"instruction": "b", "id": "x"}], {}, r"\(row 2\): duplicate id 'x'"),
    ],
)
def test_bad_parquet_rows_are_named(tmp_path: Path, rows: list[dict], columns: dict, message: str) -> None:
    arrays = {name: pa.array(values) for name, values in columns.items()}
    path = write_parquet(tmp_path / "bad.parquet", rows, **arrays)
    with pytest.raises(PoolError, match=rf"bad\.parquet:? {message}"):
        load_pool(path)


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text('{"instruction": "Write a poem."}\n')
    with pytest.raises(PoolError, match=r"fake\.parquet: not a readable Parquet file"):
        load_pool(path)
    with pytest.raises(PoolError, match="no such file"):
        load_pool(tmp_path / "missing.parquet")
