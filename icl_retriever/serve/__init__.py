"""``icl-retriever serve``: the retriever as an HTTP service (``pip install "icl-retriever[serve]"``).

:func:`create_app` builds the FastAPI app over a :class:`~icl_retriever.Retriever`; :func:`serve` opens an
index directory and runs it under uvicorn. The modules: :mod:`.models` (request and response bodies),
:mod:`.batching` (micro-batching), :mod:`.auth`, :mod:`.limits`, :mod:`.metrics`, :mod:`.reload` (new
versions on disk), :mod:`.settings`. FastAPI, uvicorn and prometheus-client are imported on first use, so
the CLI starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from icl_retriever.serve.settings import ServeSettings

if TYPE_CHECKING:
    from icl_retriever.serve.app import create_app
    from icl_retriever.serve.server import serve

__all__ = ["ServeSettings", "create_app", "require_serve_extra", "serve"]


def require_serve_extra() -> None:
    """Raise ``ImportError`` saying what to install when FastAPI, uvicorn or prometheus-client is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f'icl-retriever serve needs the serve extra: pip install "icl-retriever[serve]" ({exc})') from exc


def __getattr__(name: str) -> Any:
    if name == "create_app":
        require_serve_extra()
        from icl_retriever.serve.app import create_app

        return create_app
    if name == "serve":
        from icl_retriever.serve.server import serve

        return serve
    raise AttributeError(f"module 'icl_retriever.serve' has no attribute {name!r}")
