"""icl-retriever: pick few-shot demonstrations for LLM prompts by task, not by topic."""

from icl_retriever._version import __version__
from icl_retriever.encoder import EncoderConfig, PIEEncoder
from icl_retriever.errors import (
    EncoderMismatchError,
    ICLRetrieverError,
    IndexBusyError,
    IndexExistsError,
    IndexFormatError,
    IndexWriteError,
    ModelLoadError,
    PoolError,
)
from icl_retriever.records import Demo, default_pool_path, load_pool
from icl_retriever.build import build_index
from icl_retriever.retriever import Retriever
from icl_retriever.store import IndexParams

__all__ = [
    "Demo",
    "EncoderConfig",
    "EncoderMismatchError",
    "ICLRetrieverError",
    "IndexBusyError",
    "IndexExistsError",
    "IndexFormatError",
    "IndexParams",
    "IndexWriteError",
    "ModelLoadError",
    "PIEEncoder",
    "PoolError",
    "Retriever",
    "__version__",
    "build_index",
    "default_pool_path",
    "load_pool",
]
