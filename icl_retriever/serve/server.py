"""Running the app: open an index directory and serve it with uvicorn (``icl-retriever serve``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from icl_retriever.encoder import Runtime
from icl_retriever.retriever import Retriever
from icl_retriever.serve.settings import ServeSettings

logger = logging.getLogger("icl_retriever.serve")


def read_token(env_name: str | None) -> str | None:
    """The API token from the environment variable ``env_name`` (not from the command line, where
    ``ps`` would show it).

    Raises:
        ValueError: the variable is not set or empty.
    """
    if env_name is None:
        return None
    token = os.environ.get(env_name, "")
    if not token.strip():
        raise ValueError(f"--token-env {env_name}: the environment variable is not set or empty")
    return token


def serve(
    index: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_env: str | None = None,
    settings: ServeSettings | None = None,
    model: str | None = None,
    runtime: Runtime = "auto",
    mmap: bool = False,
    access_log: bool = False,
    log_level: str = "info",
) -> None:
    """Serve an index directory over HTTP until interrupted.

    Args:
        index: the index directory; versions written there later are served as they appear.
        host, port: where to listen (loopback by default: put a TLS proxy in front to serve a network).
        token_env: the environment variable holding the bearer token; ``None``: no authentication and no
            updates over HTTP.
        settings: limits, batching and reloading.
        model, runtime, mmap: as for :meth:`Retriever.from_index`.
        access_log: log every request (uvicorn's access log).

    Raises:
        ValueError: the token variable is unset or empty.
        IndexFormatError, EncoderMismatchError, ModelLoadError: the index cannot be opened.
    """
    from icl_retriever.serve import require_serve_extra

    require_serve_extra()
    import uvicorn

    from icl_retriever.serve.app import create_app

    token = read_token(token_env)
    retriever = Retriever.from_index(index, model=model, runtime=runtime, mmap=mmap)
    app = create_app(retriever, settings, token=token)
    logger.info("serving %s (%d demos) on http://%s:%d%s", index, len(retriever), host, port,
                " with a bearer token" if token else "")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            server_header=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
