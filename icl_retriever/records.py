"""Demonstration records and the pool formats they are read from.

A pool is validated completely before any embedding work starts, so a bad line at the end of a large
file fails in seconds, and every error is one line naming the file, the line (or record, or row) and the
field at fault. Pool files are validated in a first pass that keeps nothing (:func:`check_pool_files`), so
memory is bounded by a file's text or a batch of Parquet rows (:mod:`icl_retriever.pool_parquet`) until
the pool is known to be good.
"""

from __future__ import annotations

import hashlib
import glob
import json
import re
import math
import sys
from importlib import resources
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icl_retriever.errors import PoolError

#: Fields of a record that are not metadata.
CORE_FIELDS = ("id", "instruction", "input", "output")
#: File name endings read as Parquet (one record per row) rather than JSON / JSONL.
PARQUET_SUFFIXES = (".parquet", ".pq")


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


#: Characters of a long text escaped and encoded at a time (:func:`json_string_pieces`).
PIECE_CHARS = 1 << 20


def json_string_pieces(text: str) -> Iterator[bytes]:
    """``json.dumps(text, ensure_ascii=False).encode()``, in pieces of :data:`PIECE_CHARS` characters: the same
    bytes (JSON escapes character by character, and a Python string has no surrogate pairs to split), without
    ever holding a whole copy of a long text, escaped or encoded."""
    if len(text) <= PIECE_CHARS:
        yield json.dumps(text, ensure_ascii=False).encode()
        return
    yield b'"'
    for start in range(0, len(text), PIECE_CHARS):
        yield json.dumps(text[start : start + PIECE_CHARS], ensure_ascii=False)[1:-1].encode()
    yield b'"'


def stable_id(instruction: str, input: str, output: str) -> str:
    """A content hash, so rebuilding the same pool gives the same ids: sha256 of
    ``json.dumps([instruction, input, output], ensure_ascii=False)`` (fed in pieces when a text is long)."""
    if max(len(instruction), len(input), len(output)) <= PIECE_CHARS:
        payload = json.dumps([instruction, input, output], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    digest = hashlib.sha256(b"[")
    for i, text in enumerate((instruction, input, output)):
        if i:
            digest.update(b", ")
        for piece in json_string_pieces(text):
            digest.update(piece)
    digest.update(b"]")
    return digest.hexdigest()[:16]


#: What UTF-8 cannot encode: UTF-16 surrogates (lone halves, or bytes Python carries as ``\\udcXX``).
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, what: str) -> None:
    """The text rule applied wherever text enters (pools, queries, command-line arguments, index files).

    ``value`` (a string, or JSON-like data holding strings) must be encodable as UTF-8: a lone UTF-16
    surrogate (half an emoji from truncated JSON, or a non-UTF-8 byte Python carries as ``\\udcXX``) is
    refused where it enters instead of failing in the tokenizer after a model has loaded.

    Raises:
        ValueError: naming ``what`` (and, inside data, where: ``.key`` / ``[i]``) and the offending character.
    """
    try:
        if isinstance(value, str):  # a scan, not an encoded copy of a long text: only surrogates fail UTF-8
            if _SURROGATE.search(value):
                value.encode("utf-8")
        else:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
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
            raise PoolError(f"field '{name}' must be a string, got {_describe(value)}", path=path, line=line)
        values[name] = value
    if _blank(values["instruction"]):
        raise PoolError("field 'instruction' is empty", path=path, line=line)
    metadata: dict[str, Any] = {}
    raw_meta = record.get("metadata")
    if raw_meta is not None:
        if not isinstance(raw_meta, Mapping):
            raise PoolError(f"field 'metadata' must be an object, got {_describe(raw_meta)}", path=path, line=line)
        metadata.update(raw_meta)
    metadata.update({k: v for k, v in record.items() if k not in CORE_FIELDS and k != "metadata"})
    if task is not None:
        metadata.setdefault("task", task)
    problem = not_plain_json(metadata, "metadata")
    if problem:
        raise PoolError(problem, path=path, line=line)
    try:
        for name, value in values.items():
            check_text(value, f"field '{name}'")
        check_text(metadata, "metadata")
    except ValueError as exc:
        raise PoolError(str(exc), path=path, line=line) from None
    raw_id = record.get("id")
    if raw_id is None:
        demo_id = stable_id(values["instruction"], values["input"], values["output"])
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and _int_text(raw_id).strip():
        demo_id = _int_text(raw_id)
        try:
            check_text(demo_id, "field 'id'")
        except ValueError as exc:
            raise PoolError(str(exc), path=path, line=line) from None
    else:
        raise PoolError(f"field 'id' must be a non-empty string or integer, got {_describe(raw_id)}", path=path, line=line)
    try:
        return Demo(id=demo_id, metadata=metadata, **values)
    except ValidationError as exc:  # the checks above should leave nothing for pydantic: say it in one line
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise PoolError(f"field '{field}': {err['msg']}", path=path, line=line) from None


class LongInt:
    """A JSON integer of more digits than Python converts (``sys.get_int_max_str_digits()``, 4300 by
    default), kept as its digits so that the record holding it is named instead of the whole file failing."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits


def load_json(text: str) -> Any:
    """``json.loads``, except that an integer too long for Python is read as a :class:`LongInt` (a second
    parse, only for such a document), for :func:`demo_from_record` to refuse with its place."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        if "digits" not in str(exc):
            raise
        return json.loads(text, parse_int=_parse_int)


def _parse_int(digits: str) -> int | LongInt:
    try:
        return int(digits)
    except ValueError:
        return LongInt(digits)


def _int_text(value: str | int) -> str:
    """``str(value)``, or "" for an integer too long for Python to write out."""
    try:
        return str(value)
    except ValueError:
        return ""


def _describe(value: Any) -> str:
    """A short description of a wrong value, for messages (never the whole of a huge one)."""
    if isinstance(value, LongInt):
        return f"an integer of {len(value.digits.lstrip('-'))} digits (Python reads at most {_max_digits()})"
    if isinstance(value, int) and not isinstance(value, bool) and not _int_text(value):
        return f"an integer of more than {_max_digits()} digits"
    text = repr(value)
    return text if len(text) <= 80 else f"{type(value).__name__} {text[:60]}..."


def _max_digits() -> int:
    return sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


def not_plain_json(value: Any, where: str) -> str | None:
    """Why ``value`` does not survive a JSON round trip unchanged (naming where in it), or None: a key that
    is not a string (JSON would turn it into one), a NaN or infinity, an integer too long to write out, or
    a value of another type."""
    try:
        return _first_not_json(value, where)
    except RecursionError:
        return f"{where} is nested too deeply"


def _first_not_json(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, (str, bool)):
        return None
    if isinstance(value, int):
        return None if _int_text(value) else f"{where} is {_describe(value)}"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value}, which JSON cannot hold"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a key that is not a string: {_describe(key)} ({type(key).__name__})"
            found = _first_not_json(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, LongInt):
        return f"{where} is {_describe(value)}"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_not_json(item, f"{where}[{i}]")
            if found:
                return found
        return None
    return f"{where} is not plain JSON: {_describe(value)} ({type(value).__name__})"


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
        return iter_parquet(path, str(path))
    return iter_pool_text(read_text(path), str(path))


def iter_parquet(source: bytes | str | Path, name: str) -> Iterator[tuple[str, Demo]]:
    """(where, demo) pairs of a Parquet pool file (its path, or its bytes as Ray reads them), read a batch of
    rows at a time (:mod:`icl_retriever.pool_parquet`). A ``metadata`` column may be a struct, a map with
    string keys or a JSON object string.

    Raises:
        PoolError: pyarrow is missing, the file is not Parquet, or a row is malformed (file, row, field named).
    """
    from icl_retriever.pool_parquet import iter_parquet_rows  # pyarrow, only for Parquet files

    for where, record in iter_parquet_rows(source, name):
        if isinstance(meta := record.get("metadata"), str):
            try:
                record["metadata"] = load_json(meta)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise PoolError(f"field 'metadata' is a string but not a JSON object ({exc})", path=where) from exc
        yield where, demo_from_record(record, path=where)


def is_parquet(name: str | Path) -> bool:
    """Whether a pool file is read as Parquet (by its name: ``.parquet`` / ``.pq``)."""
    return str(name).lower().endswith(PARQUET_SUFFIXES)


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
            whole = load_json(text)
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
    for lineno, line in enumerate(_lines(text), start=1):
        if _blank(line):
            continue
        try:
            record = load_json(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=name, line=lineno) from exc
        except RecursionError as exc:
            raise PoolError("JSON nested too deeply", path=name, line=lineno) from exc
        yield f"{name}:{lineno}", demo_from_record(record, path=name, line=lineno)


def _blank(text: str) -> bool:
    """``not text.strip()`` without the copy ``strip`` makes of a long text."""
    return not text or text.isspace()


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (``str.split`` would copy the whole file at once)."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


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
        check_pool_files([Path(source)])
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
    files = pool_files(paths)
    check_pool_files(files)
    located = [pair for path in files for pair in _iter_file(path)]
    return unique_ids(located, str(paths[0]) if len(paths) == 1 else f"{len(paths)} pool files")


def check_pool_files(files: Sequence[Path]) -> None:
    """Validate every record of pool files in memory bounded by a file's text (JSON) or a batch of rows
    (Parquet), keeping none: the pass before a pool is held in memory, so that a bad record at the end of
    millions (a few kilobytes of Parquet can hold them) is refused without holding all before it. Ids used
    twice are found while the pool is loaded.

    Raises:
        PoolError: a file is missing or unreadable, or a record is malformed (file and line or row named).
    """
    for path in files:
        for _ in _iter_file(path):
            pass


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
        self._suffix: dict[str, int] = {}  # the last suffix given to repeats of an id: n repeats cost O(n)

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
            n = self._suffix.get(demo.id, 1) + 1  # identical content without an explicit id: keep both,
            while f"{demo.id}-{n}" in self.first:  # distinguishable and still stable
                n += 1
            self._suffix[demo.id] = n
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
