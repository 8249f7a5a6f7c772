"""The demo records of an index, read one at a time: ``demos.<token>.jsonl`` and its offset table.

An index of 10^8 demos cannot hold its records in memory. Beside the JSONL the writer keeps
``offsets.<token>.u64``: n + 1 little-endian byte offsets, record i being the line between offsets i and
i + 1. :class:`MappedDemos` maps both files and parses a record only when it is asked for, so a query
reads the k demos it returns. Loading checks what it can without parsing every line (sizes, sha256, the
offsets rising from 0 to the file's end, a newline ending each record); each record is validated when read,
with the same rules and messages as an eager load.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
from pydantic import ValidationError

from icl_retriever.errors import IndexFormatError
from icl_retriever import records
from icl_retriever.records import Demo, json_string_pieces

#: dtype of the offset table: little-endian unsigned 64-bit byte offsets.
OFFSET_DTYPE = np.dtype("<u8")


def record_chunks(demo: Demo) -> Iterator[bytes]:
    """A demo as one line of a records file (JSON, UTF-8, newline-ended), in pieces: the one place that format
    is written. The bytes are those of ``json.dumps(record, ensure_ascii=False) + "\\n"``, but a long text goes
    through :func:`~icl_retriever.records.json_string_pieces`, so writing a demo of a 60 MB instruction holds a
    piece of it, not three copies."""
    record = demo.record()
    if all(not isinstance(v, str) or len(v) <= records.PIECE_CHARS for v in record.values()):
        yield (json.dumps(record, ensure_ascii=False) + "\n").encode()  # the usual demo: one piece
        return
    for i, (key, value) in enumerate(record.items()):
        yield (("{" if i == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": ").encode()
        if isinstance(value, str):
            yield from json_string_pieces(value)
        else:
            yield json.dumps(value, ensure_ascii=False).encode()
    yield b"}\n"


def record_line(demo: Demo) -> bytes:
    """A demo's whole line of a records file (see :func:`record_chunks`), for writers of a few demos."""
    return b"".join(record_chunks(demo))


def offset_table(sizes: Iterable[int]) -> bytes:
    """The offset table of records of ``sizes`` bytes each (newline included), as written beside them."""
    lengths = np.fromiter(sizes, dtype=np.uint64)
    offsets = np.zeros(len(lengths) + 1, dtype=OFFSET_DTYPE)
    np.cumsum(lengths, out=offsets[1:])
    return offsets.tobytes()


class MappedDemos(Sequence[Demo]):
    """The demos of an index as a read-only sequence over memory-mapped files; record ``i`` is parsed on access.

    Args:
        demos_file: the JSONL records (one per line, in index order).
        offsets_file: the offset table (see the module docstring).
        count: how many demos the manifest says the index holds.

    Raises:
        IndexFormatError: the offset table does not describe ``count`` newline-ended records of the file.
    """

    def __init__(self, demos_file: Path, offsets_file: Path, count: int, demos_map: mmap.mmap | None,
                 offsets_map: mmap.mmap) -> None:
        self.file = demos_file
        self._data = demos_map  # None: an empty file (nothing to map)
        self._offsets = np.frombuffer(offsets_map, dtype=OFFSET_DTYPE)
        size = 0 if demos_map is None else len(demos_map)
        offsets = self._offsets
        if len(offsets) != count + 1:
            raise IndexFormatError(f"{offsets_file}: holds {len(offsets) - 1} offsets, manifest says {count} demos")
        if offsets[0] != 0 or offsets[-1] != size or (offsets > size).any() or (np.diff(offsets.astype(np.int64)) < 2).any():
            raise IndexFormatError(
                f"{offsets_file}: the offsets do not rise from 0 to the end of {demos_file.name} ({size} bytes), a "
                "line of at least 2 bytes per demo"
            )
        if count and demos_map is not None:
            ends = np.frombuffer(demos_map, dtype=np.uint8)[offsets[1:].astype(np.int64) - 1]
            if (ends != ord("\n")).any():
                line = int(np.flatnonzero(ends != ord("\n"))[0]) + 1
                raise IndexFormatError(f"{demos_file}:{line}: the offset table does not end this record at a newline")

    @classmethod
    def open(cls, demos_file: Path, offsets_file: Path, count: int) -> MappedDemos:
        """Map a records file and its offset table that this process wrote (no sha256 to check against)."""
        maps = []
        for file in (demos_file, offsets_file):
            with file.open("rb") as fh:
                maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if file.stat().st_size else None)
        if maps[1] is None:
            raise IndexFormatError(f"{offsets_file}: empty")
        return cls(demos_file, offsets_file, count, maps[0], maps[1])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> Demo: ...
    @overload
    def __getitem__(self, i: slice) -> list[Demo]: ...

    def __getitem__(self, i: int | slice) -> Demo | list[Demo]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        row = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= row < n:
            raise IndexError(f"demo {i} out of range ({n} demos)")
        assert self._data is not None
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        line = self._data[start : end - 1]
        try:
            demo = Demo.model_validate_json(line)
        except ValidationError as exc:
            raise IndexFormatError(f"{self.file}:{row + 1}: invalid demo record ({exc.errors()[0]['msg']})") from exc
        if not demo.instruction.strip() or not demo.id.strip():
            raise IndexFormatError(f"{self.file}:{row + 1}: empty {'id' if not demo.id.strip() else 'instruction'}")
        return demo

    def __iter__(self) -> Iterator[Demo]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"MappedDemos({len(self)} demos in {self.file.name})"
