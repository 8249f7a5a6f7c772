"""Pool edge cases JSON and Parquet can hold: each is a one-line PoolError naming file, line or row, and
field; Parquet pools are validated a batch at a time."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from icl_retriever import PoolError, Retriever, load_pool
from icl_retriever.records import UniqueIds, demo_from_record, load_pools

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DIGITS = "7" * 5000  # more than Python's 4,300-digit limit for int <-> str


def not_utf8(values: list[bytes]) -> object:
    """A string column holding bytes that are not UTF-8 (pyarrow does not check what it is given)."""
    data = b"".join(values)
    ends = [0]
    for v in values:
        ends.append(ends[-1] + len(v))
    offsets = pa.py_buffer(pa.array(ends, type=pa.int32()).buffers()[1])
    return pa.Array.from_buffers(pa.string(), len(values), [None, offsets, pa.py_buffer(data)])


def write(path: Path, table: object) -> Path:
    pq.write_table(table, path, row_group_size=2)
    return path


def one_line(exc: pytest.ExceptionInfo[PoolError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "validation error" not in text and "\\n" not in text
    return text


@pytest.mark.parametrize("column", ["instruction", "input", "output", "id", "note"])
def test_parquet_string_that_is_not_utf8_names_row_and_column(tmp_path: Path, column: str) -> None:
    columns = {"instruction": pa.array(["Add.", "Sub.", "Mul."])}
    columns[column] = not_utf8([b"fine", b"also fine", b"bad \xff byte"])
    path = write(tmp_path / "p.parquet", pa.table(columns))
    with pytest.raises(PoolError) as exc:
        load_pool(path)
    assert one_line(exc).endswith(f"p.parquet (row 3): column '{column}' is not valid UTF-8 text (byte 0xff at offset 4)")


def test_parquet_string_that_is_not_utf8_inside_a_struct(tmp_path: Path) -> None:
    inner = pa.StructArray.from_arrays([not_utf8([b"ok", b"\xc3("])], names=["source"])
    path = write(tmp_path / "s.parquet", pa.table({"instruction": ["Add.", "Sub."], "metadata": inner}))
    with pytest.raises(PoolError, match=r"s\.parquet \(row 2\): column 'metadata' is not valid UTF-8"):
        load_pool(path)


@pytest.mark.parametrize(("key_type", "key"), [(pa.int64(), 1), (pa.float64(), 1.5), (pa.bool_(), True)])
def test_parquet_map_metadata_with_keys_that_are_not_strings(tmp_path: Path, key_type: object, key: object) -> None:
    meta = pa.array([[], [(key, "x")]], type=pa.map_(key_type, pa.string()))
    path = write(tmp_path / "m.parquet", pa.table({"instruction": ["Add.", "Sub."], "metadata": meta}))
    with pytest.raises(PoolError) as exc:
        load_pool(path)
    assert f"m.parquet (row 2): field 'metadata' is a map with a key that is not a string: {key!r}" in one_line(exc)


def test_duplicate_parquet_columns_are_refused(tmp_path: Path) -> None:
    table = pa.Table.from_arrays([pa.array(["Add."]), pa.array(["Sub."])], names=["instruction", "instruction"])
    with pytest.raises(PoolError, match=r"d\.parquet: column 'instruction' appears 2 times"):
        load_pool(write(tmp_path / "d.parquet", table))
    nested = pa.StructArray.from_arrays([pa.array([1]), pa.array([2])], names=["n", "n"])
    table = pa.table({"instruction": ["Add."], "metadata": nested})
    with pytest.raises(PoolError, match=r"e\.parquet: column 'metadata': field 'n' appears 2 times"):
        load_pool(write(tmp_path / "e.parquet", table))


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("p.jsonl", f'{{"instruction": "a"}}\n{{"instruction": "b", "n": {DIGITS}}}\n', r"p\.jsonl:2: metadata\.n"),
        ("p.jsonl", f'{{"instruction": "a", "id": {DIGITS}}}\n', r"p\.jsonl:1: field 'id'"),
        ("p.jsonl", f'{{"instruction": {DIGITS}}}\n', r"p\.jsonl:1: field 'instruction'"),
        ("l.json", f'[{{"instruction": "a"}},\n {{"instruction": "b", "metadata": {{"x": [1, -{DIGITS}]}}}}]',
         r"l\.json \(record 2\): metadata\.x\[1\]"),
        ("i.json", f'{{"add": {{"samples": [{{"instruction": "a", "k": {DIGITS}}}]}}}}',
         r"i\.json \(task 'add', sample 1\): metadata\.k"),
    ],
)
def test_integers_too_long_for_python_are_named(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PoolError) as exc:
        load_pool(path)
    assert "digits" in one_line(exc)
    assert exc.match(where)


def test_integer_too_long_in_a_json_metadata_string(tmp_path: Path) -> None:
    meta = pa.array(["{}", f'{{"n": {DIGITS}}}'])
    path = write(tmp_path / "j.parquet", pa.table({"instruction": ["Add.", "Sub."], "metadata": meta}))
    with pytest.raises(PoolError, match=r"j\.parquet \(row 2\): metadata\.n is an integer of 5000 digits"):
        load_pool(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "a", "metadata": {1: "x"}}, r"record 1: metadata has a key that is not a string: 1 \(int\)"),
        ({"instruction": "a", "metadata": {"a": {(1, 2): "x"}}}, r"metadata\.a has a key that is not a string"),
        ({"instruction": "a", 2.5: "x"}, r"metadata has a key that is not a string: 2\.5"),
        ({"instruction": "a", "metadata": {"n": float("inf")}}, r"metadata\.n is inf, which JSON cannot hold"),
        ({"instruction": "a", "metadata": {"b": b"raw"}}, r"metadata\.b is not plain JSON: b'raw' \(bytes\)"),
        ({"instruction": "a", "id": 7 * 10**5000}, r"field 'id' must be .* an integer of more than 4300 digits"),
    ],
)
def test_records_from_python_are_refused_in_one_line(record: dict, message: str) -> None:
    with pytest.raises(PoolError, match=message) as exc:
        load_pool([record])
    one_line(exc)


def test_add_with_a_metadata_key_that_is_not_a_string(default_retriever: Retriever) -> None:
    before = len(default_retriever)
    with pytest.raises(PoolError, match=r"record 1: metadata has a key that is not a string: 7 \(int\)") as exc:
        default_retriever.add([{"instruction": "Add two numbers.", "metadata": {7: "seven"}}], persist=False)
    one_line(exc)
    assert len(default_retriever) == before


def test_add_example_with_a_key_that_is_not_a_string(default_retriever: Retriever) -> None:
    pytest.importorskip("langchain_core")
    from icl_retriever.langchain import PIEExampleSelector

    selector = PIEExampleSelector(retriever=default_retriever, k=2)
    before = len(default_retriever)
    for example in ({"question": "What is 2 + 2?", 4: "four"}, {"instruction": "Add.", "metadata": {1: "x"}}):
        with pytest.raises(PoolError, match="key that is not a string") as exc:
            selector.add_example(example)
        one_line(exc)
    assert len(default_retriever) == before


def test_a_bad_last_row_of_many_is_found_in_bounded_memory(tmp_path: Path) -> None:
    """40,000 equal rows are a few hundred bytes of zstd; holding them all would take tens of MB."""
    rows = 40_000
    instructions = pa.array(["Add the two numbers."] * (rows - 1) + [" "])
    path = tmp_path / "many.parquet"
    pq.write_table(pa.table({"instruction": instructions}), path, compression="zstd")
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(PoolError, match=rf"many\.parquet \(row {rows}\): field 'instruction' is empty"):
            load_pools([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"validation held {peak / 2**20:.0f} MiB"


def test_repeated_content_gets_suffixed_ids_in_linear_time() -> None:
    class Counting(dict):
        looked = 0

        def __contains__(self, key: object) -> bool:
            Counting.looked += 1
            return super().__contains__(key)

    ids = UniqueIds()
    ids.first = Counting()
    demo = demo_from_record({"instruction": "Add."})
    got = [ids.add(f"record {i}", demo.model_copy()).id for i in range(5_000)]
    assert got[:3] == [demo.id, f"{demo.id}-2", f"{demo.id}-3"] and got[-1] == f"{demo.id}-5000"
    assert Counting.looked < 3 * 5_000  # not 12.5 million: each repeat starts after the last suffix given


def test_valid_pools_still_load_whole(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and 1."}) + "\n" for i in range(5)), encoding="utf-8")
    assert len(load_pool(path)) == 5 and len(load_pools([path, path])) == 10
