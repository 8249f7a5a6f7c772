"""The manifest: what an index directory holds, as pydantic models, and the rules a manifest obeys.

``manifest.json`` is the commit record of an index directory: it names the data file of each role
(``index.<token>.faiss``, ``demos.<token>.jsonl``, optionally ``topic.<token>.faiss`` and the demos' offset
table ``offsets.<token>.u64``) with its size and sha256, and describes the encoder, the shape and the FAISS
index type and parameters.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from icl_retriever._version import __version__
from icl_retriever.encoder import EncoderConfig

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS = "vectors"
DEMOS = "demos"
#: Optional role: topic (content) vectors of instruction + input, row i for demo i, as a flat index.
TOPIC = "topic"
#: Optional role: where each demo's line starts in the demos file, so a record is read without the rest.
OFFSETS = "offsets"
FILE_SUFFIX = {VECTORS: ".faiss", DEMOS: ".jsonl", TOPIC: ".faiss", OFFSETS: ".u64"}
FILE_PREFIX = {VECTORS: "index.", DEMOS: "demos.", TOPIC: "topic.", OFFSETS: "offsets."}
#: Data file names as this library writes them (``index.<token>.faiss``): no separators, NUL or spaces.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

IndexType = Literal["flat", "hnsw", "ivf", "ivfpq"]


class FileEntry(BaseModel):
    """One data file of the current version: its name, size and hash, checked at load."""

    model_config = ConfigDict(extra="forbid")

    name: str
    size: int
    sha256: str


class IndexParams(BaseModel):
    """Parameters of the vector index: HNSW's ``M`` / ``ef_construction`` / ``ef_search``, IVF's
    ``nlist`` / ``nprobe`` (and IVF-PQ's ``pq_m``); empty for flat. ``ef_search`` and ``nprobe`` are applied
    at load."""

    model_config = ConfigDict(extra="forbid")

    M: int | None = Field(None, ge=2, le=1024, description="HNSW: links per node (2 M on the bottom layer)")
    ef_construction: int | None = Field(None, ge=1, description="HNSW: candidate list size while building")
    ef_search: int | None = Field(None, ge=1, description="HNSW: candidate list size while searching")
    nlist: int | None = Field(None, ge=1, description="IVF: number of clusters")
    nprobe: int | None = Field(None, ge=1, description="IVF: clusters visited per search")
    pq_m: int | None = Field(
        None, ge=1, le=1024,
        description="IVF-PQ: sub-quantisers of 8 bits, i.e. bytes per stored vector (must divide the dimension)",
    )


#: Which :class:`IndexParams` fields each index type has (all of them required, no others).
PARAMS_OF: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe"),
    "ivfpq": ("nlist", "nprobe", "pq_m"),
}


class TopicInfo(BaseModel):
    """The topic vectors beside the PIE ones: which encoder made them (``rerank="task_then_topic"``).

    ``source`` is ``"base_static"`` for the mean of the base model's word-piece embeddings (the default
    encoder's, ``"default-base"``: no forward pass), ``"base_model"`` for the base model's contextual
    embedding (what indexes of the default held before 0.x), ``"same_model_plain"`` for the index's own
    model without its template (any other model).
    """

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderConfig
    fingerprint: str
    source: Literal["base_static", "base_model", "same_model_plain"]
    dim: int = Field(ge=1)


class Manifest(BaseModel):
    """What an index is: format, encoder identity, shape, version, and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(FORMAT_VERSION, strict=True, ge=1, le=FORMAT_VERSION)
    library_version: str = __version__
    created: datetime
    updated: datetime
    generation: int = 1
    encoder: EncoderConfig
    fingerprint: str
    dim: int
    count: int
    index_type: IndexType = "flat"
    index_params: IndexParams = Field(default_factory=IndexParams)
    recall_at_10: float | None = Field(
        None, ge=0.0, le=1.0, description="approximate index: share of the exact top 10 it returns (sampled at build)"
    )
    metric: Literal["inner_product"] = "inner_product"
    topic: TopicInfo | None = None
    files: dict[Literal["vectors", "demos", "topic", "offsets"], FileEntry]


def manifest_problem(manifest: Manifest) -> str | None:
    """What a validated manifest still gets wrong, as ``field '...': reason``, or ``None``.

    These rules span several fields: the required data files, file names that stay inside the index
    directory, a sane shape, topic info and topic file together, and exactly the parameters of the
    index type.
    """
    for role in (VECTORS, DEMOS):
        if role not in manifest.files:
            return f"field 'files.{role}': missing"
    for role, entry in manifest.files.items():
        if not _FILE_NAME.fullmatch(entry.name) or not entry.name.endswith(FILE_SUFFIX[role]):
            return f"field 'files.{role}.name': {entry.name!r} is not a {role} file name"
    if manifest.count < 0 or manifest.dim < 1:
        return f"count {manifest.count} / dim {manifest.dim} out of range"
    if (TOPIC in manifest.files) != (manifest.topic is not None):
        return "field 'topic' and 'files.topic' must be both present or both absent"
    wanted = set(PARAMS_OF[manifest.index_type])
    given = {name for name, value in manifest.index_params if value is not None}
    if given != wanted:
        return (
            f"field 'index_params': a {manifest.index_type} index has parameters "
            f"{sorted(wanted) or 'none'}, the manifest gives {sorted(given) or 'none'}"
        )
    return None
