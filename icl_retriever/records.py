"""Demonstration records and the pool formats they are read from.

A pool is validated completely before any embedding work starts, so a bad line at the end of a large
file fails in seconds, and every error names the file and the line (or record) at fault.
"""

from __future__ import annotations

import hashlib
import glob
import json
from importlib import resources
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from icl_retriever.errors import PoolError

#: Fields of a record that are not metadata.
CORE_FIELDS = ("id", "instruction", "input", "output")
#: File name endings read as Parquet (one record per row) rather than JSON / JSONL.
PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH = 4096  # rows converted to Python at a time


class Demo(BaseModel):
    """One demonstration: what the LLM is asked, on what, and a good answer.

    Only ``instruction`` is embedded: it carries the task. ``score`` is set on retrieved results
    (cosine similarity of the instruction embeddings; higher is closer).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="unique within a pool; a content hash of instruction, input and output when the "
                    "pool gives none")
    instruction: str = Field(description="what the LLM is asked to do; the only field embedded (it carries the task)")
    input: str = Field("", description="what the instruction works on (may be empty)")
    output: str = Field("", description="a good answer: what the demo shows the LLM")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="every other field of the record (e.g. ``task``, ``domain``), for filters and your prompts",
    )
    score: float | None = Field(None, description="set on retrieved demos: the PIE (task) cosine to the query")

    def record(self) -> dict[str, Any]:
        """The stored form: everything but the retrieval score."""
        return self.model_dump(exclude={"score"})


def stable_id(instruction: str, input: str, output: str) -> str:
    """A content hash, so rebuilding the same pool gives the same ids."""
    payload = json.dumps([instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_text(value: Any, what: str) -> None:
    """The text rule applied wherever text enters (pools, queries, command-line arguments, index files).

    ``value`` (a string, or JSON-like data holding strings) must be encodable as UTF-8: a lone UTF-16
    surrogate (half an emoji from truncated JSON, or a non-UTF-8 byte Python carries as ``\\udcXX``) is
    refused where it enters instead of failing in the tokenizer after a model has loaded.

    Raises:
        ValueError: naming ``what`` (and, inside data, where: ``.key`` / ``[i]``) and the offending character.
    """
    try:
        (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode("utf-8")
    except UnicodeEncodeError:
        where, text = _first_bad_string(value, "")
        exc = _encode_error(text)
        code = ord(text[exc.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        where = f" at {where.lstrip('.')}" if where.startswith((".", "[")) else where
        raise ValueError(
            f"{what}{where} is not valid UTF-8 text ({bad}: a truncated emoji or a mis-decoded byte?)"
        ) from None


def _encode_error(text: str) -> UnicodeEncodeError:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc
    raise AssertionError("encodable")


def _first_bad_string(value: Any, where: str) -> tuple[str, str]:
    """``(location, string)`` of the first string in ``value`` (keys included) that UTF-8 cannot encode."""
    if isinstance(value, str):
        return (where, value) if _is_bad(value) else ("", "")
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if isinstance(key, str) and _is_bad(key):
            return f"{where} (key {key!r})", key
        found = _first_bad_string(item, f"{where}.{key}" if isinstance(value, Mapping) else f"{where}[{key}]")
        if found[1]:
            return found
    return "", ""


def _is_bad(text: str) -> bool:
    return not text.isascii() and any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def demo_from_record(record: Any, *, path: str | None = None, line: int | None = None, task: str | None = None) -> Demo:
    """Validate one raw record (dict or Demo) into a :class:`Demo`; unknown fields go to metadata.

    Raises:
        PoolError: naming the file and line (or record number) and the field at fault.
    """
    if isinstance(record, Demo):
        return record.model_copy(update={"score": None})
    if not isinstance(record, Mapping):
        raise PoolError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line)
    if "instruction" not in record:
        raise PoolError("record has no 'instruction' field", path=path, line=line)
    values: dict[str, str] = {}
    for name in ("instruction", "input", "output"):
        value = record.get(name, "")
        if value is None and name != "instruction":
            value = ""
        if not isinstance(value, str):
            raise PoolError(f"field '{name}' must be a string, got {type(value).__name__}", path=path, line=line)
        values[name] = value
    if not values["instruction"].strip():
        raise PoolError("field 'instruction' is empty", path=path, line=line)
    metadata: dict[str, Any] = {}
    raw_meta = record.get("metadata")
    if raw_meta is not None:
        if not isinstance(raw_meta, Mapping):
            raise PoolError(f"field 'metadata' must be an object, got {type(raw_meta).__name__}", path=path, line=line)
        metadata.update(raw_meta)
    metadata.update({k: v for k, v in record.items() if k not in CORE_FIELDS and k != "metadata"})
    if task is not None:
        metadata.setdefault("task", task)
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PoolError(f"metadata is not plain JSON ({exc})", path=path, line=line) from exc
    try:
        for name, value in values.items():
            check_text(value, f"field '{name}'")
        check_text(metadata, "metadata")
    except ValueError as exc:
        raise PoolError(str(exc), path=path, line=line) from None
    raw_id = record.get("id")
    if raw_id is None:
        demo_id = stable_id(values["instruction"], values["input"], values["output"])
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        demo_id = str(raw_id)
        try:
            check_text(demo_id, "field 'id'")
        except ValueError as exc:
            raise PoolError(str(exc), path=path, line=line) from None
    else:
        raise PoolError(f"field 'id' must be a non-empty string or integer, got {raw_id!r}", path=path, line=line)
    return Demo(id=demo_id, metadata=metadata, **values)


def read_text(path: Path) -> str:
    """A file's text, or a PoolError naming it (missing, a directory, or not UTF-8, with the line)."""
    if not path.exists():
        raise PoolError("no such file", path=str(path))
    if path.is_dir():
        raise PoolError("is a directory, expected a JSON or JSONL file", path=str(path))
    return decode_pool_bytes(path.read_bytes(), str(path))


def is_ieb(data: Any) -> bool:
    """Whether parsed JSON has the IEB file shape: ``label -> {"samples": [...]}``."""
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "samples" in v for v in data.values())


def _iter_file(path: Path) -> Iterator[tuple[str, Demo]]:
    """Yield (where, demo) pairs; ``where`` locates the record for error messages."""
    if is_parquet(path):
        if not path.is_file():
            raise PoolError("no such file" if not path.exists() else "is a directory, expected a Parquet file",
                            path=str(path))
        return iter_parquet_bytes(path.read_bytes(), str(path))
    return iter_pool_text(read_text(path), str(path))


def is_parquet(name: str | Path) -> bool:
    """Whether a pool file is read as Parquet (by its name: ``.parquet`` / ``.pq``)."""
    return str(name).lower().endswith(PARQUET_SUFFIXES)


def iter_parquet_bytes(data: bytes, name: str) -> Iterator[tuple[str, Demo]]:
    """(where, demo) pairs of a Parquet pool file's bytes: one record per row, columns as the fields of a JSONL
    record (``instruction`` required; other columns go to metadata). A ``metadata`` column may be a struct, a
    map or a JSON object string. ``where`` is ``file (row N)``, counted from 1.

    Raises:
        PoolError: pyarrow is missing, the bytes are not Parquet, or a row is malformed (file and row named).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PoolError('reading Parquet needs pyarrow: pip install "icl-retriever[parquet]"', path=name) from None
    row = 0
    try:
        batches = pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=_PARQUET_BATCH)
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                where = f"{name} (row {row})"
                yield where, demo_from_record(_parquet_record(record, where), path=where)
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise PoolError(f"not a readable Parquet file ({type(exc).__name__}: {reason})"
                        + (f" after row {row}" if row else ""), path=name) from exc


def _parquet_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A Parquet row as a JSON-like record: a map column (pairs) or JSON string as the ``metadata`` object."""
    meta = record.get("metadata")
    if isinstance(meta, list) and all(isinstance(p, tuple) and len(p) == 2 for p in meta):
        record["metadata"] = dict(meta)
    elif isinstance(meta, str):
        try:
            record["metadata"] = json.loads(meta)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PoolError(f"field 'metadata' is a string but not a JSON object ({exc})", path=where) from exc
    return record


def decode_pool_bytes(data: bytes, name: str) -> str:
    """A pool file's bytes as text (what :func:`read_text` does for bytes read elsewhere, e.g. by Ray)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PoolError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})", path=name, line=line) from exc


def iter_pool_text(text: str, name: str) -> Iterator[tuple[str, Demo]]:
    """(where, demo) pairs of a pool file's text (JSONL, JSON list or IEB), ``name`` the file in messages."""
    stripped = text.lstrip()
    whole: Any = None
    if stripped[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            # JSONL is a complete object followed by "extra data"; anything else is a broken JSON document
            # (a pretty-printed list or IEB file), whose error is where the decoder stopped.
            if stripped[0] == "[" or exc.msg != "Extra data":
                raise PoolError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=name, line=exc.lineno) from exc
            whole = None  # read as JSONL below
        except RecursionError as exc:
            raise PoolError("JSON nested too deeply", path=name) from exc
    if isinstance(whole, list):
        for i, record in enumerate(whole, start=1):
            where = f"{name} (record {i})"
            yield where, demo_from_record(record, path=where)
        return
    if is_ieb(whole):
        for label, group in whole.items():
            samples = group["samples"]
            if not isinstance(samples, list):
                raise PoolError(f"task {label!r}: 'samples' must be a list", path=name)
            for i, record in enumerate(samples, start=1):
                where = f"{name} (task {label!r}, sample {i})"
                yield where, demo_from_record(record, path=where, task=label)
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=name, line=lineno) from exc
        except RecursionError as exc:
            raise PoolError("JSON nested too deeply", path=name, line=lineno) from exc
        yield f"{name}:{lineno}", demo_from_record(record, path=name, line=lineno)


def default_pool_path() -> Path:
    """The demo pool shipped in the package (385 demos of 77 tasks; ``examples/demos.jsonl`` in the
    repository), so ``icl-retriever demo`` works right after ``pip install``.

    Returns:
        The path of the packaged JSONL pool, ready for :func:`build_index` or :func:`load_pool`.
    """
    return Path(str(resources.files("icl_retriever") / "data" / "demos.jsonl"))


def load_pool(source: str | Path | Iterable[Demo | Mapping[str, Any]]) -> list[Demo]:
    """Read and validate a whole pool.

    Args:
        source: a JSONL file (one record per line), a JSON list of Alpaca-style records, an IEB file
            (``label -> {"samples": [...]}``, the label stored as ``metadata["task"]``), a Parquet file
            (``.parquet`` / ``.pq``, one record per row; needs pyarrow), or an iterable of :class:`Demo` /
            dicts.

    Returns:
        The demos, in pool order, with ids (content hashes where the pool gave none).

    Raises:
        PoolError: the pool is empty, a record is malformed, or two records share an id.
    """
    if isinstance(source, (str, Path)):
        return unique_ids(list(_iter_file(Path(source))), str(source))
    located = [(f"record {i}", demo_from_record(r, line=i)) for i, r in enumerate(source, start=1)]
    return unique_ids(located, None)


def pool_files(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by paths or glob patterns, in order (each pattern's matches sorted).

    Raises:
        PoolError: a pattern matches nothing.
    """
    files: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise PoolError("no file matches this pattern", path=text)
        files += [Path(m) for m in matches]
    return files


def load_pools(paths: Sequence[str | Path]) -> list[Demo]:
    """:func:`load_pool` over several files or glob patterns, read in order into one pool (ids unique
    across them)."""
    if not paths:
        raise PoolError("no pool files given")
    located = [pair for path in pool_files(paths) for pair in _iter_file(path)]
    return unique_ids(located, str(paths[0]) if len(paths) == 1 else f"{len(paths)} pool files")


def unique_ids(located: list[tuple[str, Demo]], name: str | None) -> list[Demo]:
    """The demos of (where, demo) pairs, checked for ids used twice (see :class:`UniqueIds`).

    Raises:
        PoolError: no records, or an explicit id used twice (both places named).
    """
    if not located:
        raise PoolError("pool has no records", path=name)
    ids = UniqueIds()
    return [ids.add(where, demo) for where, demo in located]


class UniqueIds:
    """Ids checked as demos arrive, in pool order: an explicit id used twice is an error naming both places;
    a record without an id whose content repeats another's gets a suffixed id (``-2``, ...), so both are kept
    and stay addressable. Holds each id and where it was first used."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.first)

    def add(self, where: str, demo: Demo) -> Demo:
        """``demo``, its id suffixed if its content repeats an earlier record's (it is changed in place).

        Raises:
            PoolError: its explicit id was used before.
        """
        if demo.id in self.first:
            if demo.id != stable_id(demo.instruction, demo.input, demo.output):
                raise PoolError(f"{where}: duplicate id {demo.id!r} (first used at {self.first[demo.id]})")
            n = 2  # identical content without an explicit id: keep both, distinguishable and still stable
            while f"{demo.id}-{n}" in self.first:
                n += 1
            demo.id = f"{demo.id}-{n}"
        self.first[demo.id] = where
        return demo


def demo_fields(demo: Demo) -> dict[str, Any]:
    """A demo as the fields a framework's example carries: ``instruction``, ``input``, ``output``, then its
    metadata (a metadata key never hides a text field; the retrieval ``score`` is left out)."""
    fields: dict[str, Any] = {"instruction": demo.instruction, "input": demo.input, "output": demo.output}
    fields.update({key: value for key, value in demo.metadata.items() if key not in CORE_FIELDS and key != "score"})
    return fields


def join_fields(values: Mapping[str, Any], keys: Sequence[str], *, among: str) -> str:
    """The ``keys`` fields of ``values``, stripped and joined by blank lines: the text PIE embeds for a
    record or request spread over several fields (LangChain examples and prompt variables, DSPy inputs).

    Raises:
        KeyError: a key is missing (named, with the fields there are: ``among`` says what they are).
    """
    missing = [key for key in keys if key not in values]
    if missing:
        raise KeyError(f"input_keys {missing} not among the {among} {sorted(values)}")
    return "\n\n".join(text for text in (str(values[key]).strip() for key in keys) if text)
