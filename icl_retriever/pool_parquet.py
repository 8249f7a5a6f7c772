"""Parquet pool files: one record per row, columns as the fields of a JSONL record.

A Parquet file says nothing of its size in rows (a few kilobytes of zstd can hold millions of equal rows,
or one string of hundreds of megabytes), so it is read a batch of rows at a time, each batch validated
and let go before the next is decoded. What JSON cannot say, Parquet can, and each is refused with the
file, row and column: a column name used twice (a dict would keep the last silently), a string that is
not UTF-8, a map with keys that are not strings.

``pip install "icl-retriever[parquet]"``; ``pyarrow`` is imported only here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icl_retriever.errors import PoolError

#: Rows decoded to Python at a time: the memory of a read is a batch, whatever the file holds.
BATCH_ROWS = 1024


def iter_parquet_rows(source: bytes | str | Path, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs of a Parquet pool file (its path, or its bytes as Ray reads them): one record
    per row, columns as the fields of a JSONL record, a map ``metadata`` column as a dict (a JSON string is
    left to :func:`icl_retriever.records.iter_parquet`, which makes the demos). ``where`` is ``file (row N)``,
    counted from 1.

    Raises:
        PoolError: pyarrow is missing, the file is not Parquet, a column name is used twice, or a row is
            malformed (file, row and column or field named).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PoolError('reading Parquet needs pyarrow: pip install "icl-retriever[parquet]"', path=name) from None
    row = 0
    try:
        file = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else str(source))
        _check_schema(file.schema_arrow, name)
        for batch in file.iter_batches(batch_size=BATCH_ROWS):
            for record in _rows(batch, name, row):
                row += 1
                where = f"{name} (row {row})"
                yield where, _record(record, where)
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise PoolError(f"not a readable Parquet file ({type(exc).__name__}: {reason})"
                        + (f" after row {row}" if row else ""), path=name) from exc


def _check_schema(schema: Any, name: str) -> None:
    """Refuse a column (or struct field) name used twice, and a file without an ``instruction`` column."""
    twice = _name_used_twice(schema.names, schema.types, "column")
    if twice:
        raise PoolError(f"{twice}: only one can be read", path=name)
    if "instruction" not in schema.names:
        listed = ", ".join(repr(n) for n in schema.names[:20]) or "none"
        raise PoolError(f"no 'instruction' column (the columns: {listed})", path=name)


def _name_used_twice(names: list[str], types: list[Any], what: str) -> str | None:
    import pyarrow as pa

    counts = Counter(names)
    for field_name, count in counts.items():
        if count > 1:
            return f"{what} {field_name!r} appears {count} times"
    for field_name, kind in zip(names, types, strict=True):
        inner = _struct_fields(kind, pa)
        if inner is not None:
            found = _name_used_twice([f.name for f in inner], [f.type for f in inner], f"{what} {field_name!r}: field")
            if found:
                return found
    return None


def _struct_fields(kind: Any, pa: Any) -> list[Any] | None:
    """The fields of a struct type, or of the struct inside a list or map type; None for other types."""
    while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    if pa.types.is_map(kind):
        kind = kind.item_type
    if pa.types.is_struct(kind):
        return [kind.field(i) for i in range(kind.num_fields)]
    return None


def _rows(batch: Any, name: str, before: int) -> list[dict[str, Any]]:
    """A batch's rows as dicts; a string that is not UTF-8 (in any column, at any depth) is a PoolError
    naming its row and column (found row by row, only when the batch fails to convert)."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    for j in range(batch.num_rows):
        for column, values in zip(batch.schema.names, batch.columns, strict=True):
            try:
                values[j].as_py()
            except UnicodeDecodeError as exc:
                bad = exc.object[exc.start]
                raise PoolError(
                    f"column {column!r} is not valid UTF-8 text (byte 0x{bad:02x} at offset {exc.start})",
                    path=f"{name} (row {before + j + 1})",
                ) from None
    raise AssertionError("a batch that failed to convert converted row by row")


def _record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A Parquet row as a JSON-like record: a map column (pairs, string keys) as the ``metadata`` object."""
    meta = record.get("metadata")
    if isinstance(meta, list) and all(isinstance(p, tuple) and len(p) == 2 for p in meta):
        for key, _ in meta:
            if not isinstance(key, str):
                shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:60] + "..."
                raise PoolError(f"field 'metadata' is a map with a key that is not a string: {shown} "
                                f"({type(key).__name__})", path=where)
        record["metadata"] = dict(meta)
    return record
