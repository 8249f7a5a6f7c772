"""How a server runs: its limits, its micro-batching and how often it looks for a new index version.

Every field is a ``serve`` flag (``--max-k`` for ``max_k``, see :func:`flag_of`), generated from this model
by the CLI.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """The settings of :func:`~icl_retriever.serve.create_app`; the defaults suit one CPU host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body in bytes, refused (413) before it is read")
    max_query_chars: int = Field(8192, ge=1, description="longest query (or demo text) in characters")
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_fetch_k: int = Field(1000, ge=1, description="largest fetch_k a request may ask for")
    max_batch: int = Field(256, ge=1, description="most queries in one /v1/demos:batch request, or demos in one add")
    batch_window_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="how long a query may wait for others to share its encoder call; it waits only while more "
        "are expected (as many as the last batch held, or requests still being read); 0: never wait",
    )
    max_encoder_batch: int = Field(
        64, ge=1, description="most queries gathered into one encoder call (a larger batch request is a call of its own)"
    )
    worker_threads: int = Field(
        1, ge=1, le=64, description="encoder batches run at once (1 suits a CPU: the next batch gathers meanwhile)"
    )
    reload_interval_s: float = Field(
        0.5, ge=0.0, description="how often the index directory is checked for a newer version; 0: never"
    )


#: Fields whose ``serve`` flag is not spelled after the field (the issue's name for it).
_FLAG_NAMES = {"worker_threads": "--workers-threads"}


def flag_of(name: str) -> str:
    """The ``icl-retriever serve`` flag of a :class:`ServeSettings` field."""
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
