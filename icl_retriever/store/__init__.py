"""The index on disk: one directory with a JSON manifest, a FAISS index and the demos as JSONL.

Save and load are mirror images over one directory: :mod:`.writer` writes a version atomically under a
file lock, :mod:`.reader` reads it back, checking every file before parsing it. :mod:`.manifest` holds the
schema, :mod:`.faiss_index` builds and searches the FAISS indexes, :mod:`.recall` measures and tunes an
approximate index, :mod:`.pq_codes` measures IVF-PQ reconstructions, :mod:`.layout` checks a FAISS file's bytes before FAISS reads them, :mod:`.demo_file` reads
demo records one at a time. A loaded index can be memory-mapped (``mmap=True``) so that one larger than RAM is
searched where it lies.
"""

from icl_retriever.store.demo_file import MappedDemos, record_chunks, record_line
from icl_retriever.store.faiss_index import (
    AUTO_HNSW_FROM,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    SCORE_TOLERANCE,
    UNIT_NORM_TOLERANCE,
    all_vectors,
    check_scores,
    check_index_fits,
    check_rebuildable,
    configure_index,
    cosines,
    describe_index,
    new_flat_index,
    new_index,
    non_unit_row,
    rebuild_index,
    search,
    stored_vectors,
)
from icl_retriever.store.manifest import (
    DEMOS,
    FORMAT_VERSION,
    MANIFEST_FILE,
    OFFSETS,
    TOPIC,
    VECTORS,
    FileEntry,
    PARAMS_OF,
    IndexParams,
    IndexType,
    Manifest,
    TopicInfo,
)
from icl_retriever.store.pq_codes import PQ_NORM_RANGE
from icl_retriever.store.reader import (
    IndexVersion,
    load_index,
    load_manifest,
    load_version,
    map_demos,
    trusted_model,
)
from icl_retriever.store.recall import TARGET_RECALL, measure_recall
from icl_retriever.store.writer import build_lock, check_target, replace_file, save_index, write_lock, write_version

__all__ = [
    "AUTO_HNSW_FROM",
    "DEMOS",
    "FORMAT_VERSION",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "MANIFEST_FILE",
    "OFFSETS",
    "PQ_NORM_RANGE",
    "SCORE_TOLERANCE",
    "TARGET_RECALL",
    "TOPIC",
    "UNIT_NORM_TOLERANCE",
    "VECTORS",
    "FileEntry",
    "IndexParams",
    "PARAMS_OF",
    "IndexType",
    "IndexVersion",
    "Manifest",
    "MappedDemos",
    "TopicInfo",
    "all_vectors",
    "build_lock",
    "check_index_fits",
    "check_rebuildable",
    "check_scores",
    "check_target",
    "configure_index",
    "cosines",
    "describe_index",
    "load_index",
    "load_manifest",
    "load_version",
    "map_demos",
    "measure_recall",
    "new_flat_index",
    "new_index",
    "non_unit_row",
    "rebuild_index",
    "record_chunks",
    "record_line",
    "replace_file",
    "save_index",
    "search",
    "stored_vectors",
    "trusted_model",
    "write_lock",
    "write_version",
]
