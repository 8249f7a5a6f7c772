"""The HTTP API: a FastAPI app over a :class:`~icl_retriever.Retriever`, built by :func:`create_app`.

The routes translate JSON to library calls and back, nothing more: searches go through the
:class:`~icl_retriever.serve.batching.MicroBatcher` to :meth:`Retriever.get_demos_grouped`, updates to
:meth:`Retriever.add` / :meth:`Retriever.remove`, and new versions on disk are picked up by the
:class:`~icl_retriever.serve.reload.IndexWatcher`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from icl_retriever._version import __version__
from icl_retriever.errors import PoolError
from icl_retriever.messages import demo_messages
from icl_retriever.records import Demo
from icl_retriever.retriever import Retriever
from icl_retriever.search import SearchControls
from icl_retriever.serve.auth import AuthMiddleware, BearerToken
from icl_retriever.serve.batching import MicroBatcher
from icl_retriever.serve.errors import ErrorBody, RequestError, field_of, install_error_handlers, validation_message
from icl_retriever.serve.limits import BodyLimitMiddleware, check_demo_format, check_queries, check_sizes
from icl_retriever.serve.metrics import MetricsMiddleware, ServeMetrics
from icl_retriever.serve.models import (
    AddRequest,
    AddResponse,
    BatchItem,
    BatchRequest,
    BatchResponse,
    DemoOut,
    DemosRequest,
    DemosResponse,
    Health,
    IndexRef,
    RemoveRequest,
    RemoveResponse,
    controls_of,
)
from icl_retriever.serve.reload import IndexWatcher
from icl_retriever.serve.settings import ServeSettings
from icl_retriever.store import Manifest

logger = logging.getLogger("icl_retriever.serve")

#: The paths whose requests become batcher jobs (counted while their bodies are read).
_SEARCH_PATHS = frozenset({"/v1/demos", "/v1/demos:batch"})
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in ((401, "no or a wrong bearer token"), (413, "the body is too large"),
                       (422, "a field is invalid or over a limit; the error names it"), (500, "server error (logged)"))
}


class _Arrivals:
    """Counts search requests from their first byte until they become batcher jobs (or fail), so the
    batcher knows how many more to wait for."""

    def __init__(self, app: ASGIApp, batcher: MicroBatcher) -> None:
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in _SEARCH_PATHS:
            await self.app(scope, receive, send)
            return
        self.batcher.arriving += 1
        scope["icl_retriever.arriving"] = True
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.pop("icl_retriever.arriving", False):
                self.batcher.arriving -= 1


def create_app(retriever: Retriever, settings: ServeSettings | None = None, *, token: str | None = None) -> FastAPI:
    """The HTTP API over ``retriever``.

    Args:
        retriever: answers the searches; if it was opened from a directory, newer versions written
            there are served as they appear (every ``settings.reload_interval_s``).
        settings: limits, batching and reloading (default :class:`ServeSettings`).
        token: the bearer token every path but ``/healthz`` requires; ``None``: no authentication, and
            ``/v1/demos:add`` / ``:remove`` are refused (403).

    Returns:
        The app; run it with uvicorn, or test it with ``starlette.testclient.TestClient`` (which runs its
        lifespan: the batcher, the index watcher and a warm-up query, after which ``/readyz`` says ok).
    """
    settings = settings or ServeSettings()
    bearer = BearerToken(token)
    metrics = ServeMetrics(retriever)
    batcher = MicroBatcher(retriever, settings, on_batch=metrics.batch_size.observe)
    watcher = IndexWatcher(retriever, settings.reload_interval_s) if (
        retriever.path is not None and settings.reload_interval_s > 0) else None
    state = {"ready": False}
    paths: set[str] = set()  # the routes' paths, for the metrics' endpoint label (filled below)

    async def warm_up() -> None:
        # the first query loads the ONNX sessions and the topic model: paid before /readyz says ok
        try:
            await batcher.run(["Warm up the encoder."], SearchControls.parse(k=1))
        except Exception:
            logger.exception("the warm-up query failed; /readyz stays 503")
            return
        state["ready"] = True

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        warming = asyncio.create_task(warm_up(), name="icl-serve-warm-up")  # /healthz answers meanwhile
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            state["ready"] = False
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            if watcher is not None:
                watcher.stop()
            await batcher.stop()

    app = FastAPI(
        title="icl-retriever", version=__version__, lifespan=lifespan,
        description="Few-shot demonstrations picked by task (PIE embeddings + FAISS), over HTTP.",
        middleware=[
            Middleware(MetricsMiddleware, metrics=metrics, known=paths),
            Middleware(AuthMiddleware, token=bearer),
            Middleware(BodyLimitMiddleware, limit=settings.max_body_bytes),
            Middleware(_Arrivals, batcher=batcher),
        ],
    )
    install_error_handlers(app, _explain)
    secured = [Security(HTTPBearer(auto_error=False))]  # documents the scheme; AuthMiddleware enforces it
    v1 = APIRouter(prefix="/v1", dependencies=secured, responses=_ERRORS)

    def index_ref() -> IndexRef:
        manifest = retriever.manifest
        return IndexRef(version=manifest.generation if manifest else 0,
                        model=(manifest.encoder.model if manifest else retriever.encoder.config.model),
                        demos=len(retriever))

    async def search(http: Request, queries: list[str], request: BaseModel, field: str) -> list[list[Demo]]:
        check_queries(queries, settings, field)
        ctl = _controls(request)
        check_sizes(ctl.k, ctl.fetch_k, len(queries) if field == "queries" else None, settings)
        check_demo_format(ctl.demo_format, settings)
        _arrived(http, batcher)
        try:
            return await batcher.run(queries, ctl)
        except (ValueError, TypeError) as exc:
            raise RequestError(422, str(exc), _control_named(str(exc))) from None

    @v1.post("/demos", response_model=DemosResponse, summary="The k demos that show a query's task")
    async def demos(body: DemosRequest, http: Request) -> Response:
        found = (await search(http, [body.query], body, "query"))[0]
        out = DemosResponse(demos=_out(found), messages=demo_messages(found) if body.as_messages else None,
                            index=index_ref())
        return _json(out)

    @v1.post("/demos:batch", response_model=BatchResponse, summary="The demos of several queries, in one batch")
    async def demos_batch(body: BatchRequest, http: Request) -> Response:
        check_sizes(1, None, len(body.queries), settings)
        found = await search(http, body.queries, body, "queries")
        results = [BatchItem(demos=_out(d), messages=demo_messages(d) if body.as_messages else None) for d in found]
        return _json(BatchResponse(results=results, index=index_ref()))

    @v1.get("/index", response_model=Manifest, summary="The served index's manifest (icl-retriever info)")
    async def index() -> Response:
        manifest = retriever.manifest
        if manifest is None:
            raise RequestError(404, "this server's index was built in memory and has no manifest")
        return Response(manifest.model_dump_json(), media_type="application/json")

    def require_writes() -> None:
        if not bearer.configured:
            raise RequestError(403, "updates need a token: start the server with --token-env NAME")

    @v1.post("/demos:add", response_model=AddResponse, responses={403: {"model": ErrorBody}, 409: {"model": ErrorBody}},
             summary="Embed and add demos as one new index version")
    async def add(body: AddRequest) -> Response:
        require_writes()
        if len(body.demos) > settings.max_batch:
            raise RequestError(422, f"{len(body.demos)} demos; the limit is {settings.max_batch} a request", "demos")
        records = [d.model_dump(exclude_none=True) for d in body.demos]
        try:
            added = await asyncio.to_thread(retriever.add, records, upsert=body.upsert)
        except PoolError as exc:
            raise RequestError(409 if "already in the index" in str(exc) else 422, str(exc), "demos") from None
        except ValueError as exc:  # an ivfpq index cannot change in place
            raise RequestError(409, str(exc)) from None
        return _json(AddResponse(added=added, index=index_ref()))

    @v1.post("/demos:remove", response_model=RemoveResponse, responses={403: {"model": ErrorBody}, 409: {"model": ErrorBody}},
             summary="Remove demos by id as one new index version")
    async def remove(body: RemoveRequest) -> Response:
        require_writes()
        if len(body.ids) > settings.max_batch:
            raise RequestError(422, f"{len(body.ids)} ids; the limit is {settings.max_batch} a request", "ids")
        try:
            removed = await asyncio.to_thread(retriever.remove, body.ids)
        except ValueError as exc:
            raise RequestError(409, str(exc)) from None
        missing = sorted(set(body.ids) - set(removed))
        return _json(RemoveResponse(removed=removed, not_found=missing, index=index_ref()))

    app.include_router(v1)

    @app.get("/healthz", response_model=Health, summary="The process is up (no token needed)")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, dependencies=secured,
             responses={503: {"model": Health, "description": "still loading"}},
             summary="The index is loaded and the encoder warm")
    async def readyz() -> Response:
        ready = state["ready"]
        return _json(Health(status="ok" if ready else "starting"), 200 if ready else 503)

    @app.get("/metrics", dependencies=secured, response_class=Response, summary="Prometheus metrics (text format)")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=ServeMetrics.CONTENT_TYPE)

    paths.update(getattr(route, "path", "") for route in app.routes)
    return app


# helpers ---------------------------------------------------------------------------------------


def _arrived(request: Request, batcher: MicroBatcher) -> None:
    if request.scope.pop("icl_retriever.arriving", False):
        batcher.arriving -= 1


def _controls(request: BaseModel) -> SearchControls:
    try:
        return controls_of(request)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = validation_message(err)
        raise RequestError(422, message, field_of(err.get("loc", ())) or _control_named(message)) from None


def _explain(field: str, value: Any) -> str | None:
    """The library's message for an invalid control value (``min_score must be a cosine ...``)."""
    if field not in SearchControls.model_fields or field == "k":
        return None
    try:
        SearchControls.parse(k=1, **{field: value})
    except ValueError as exc:
        return str(exc)
    return None


def _control_named(message: str) -> str | None:
    """The control a library message starts with (``fetch_k (2) must be at least k (3)``), if any."""
    first = message.split(" ", 1)[0].strip("'\":,")
    return first if first in SearchControls.model_fields else None


def _out(demos: Sequence[Demo]) -> list[DemoOut]:
    return [DemoOut(id=d.id, instruction=d.instruction, input=d.input, output=d.output, metadata=d.metadata,
                    score=d.score if d.score is not None else float("nan")) for d in demos]


def _json(model: BaseModel, status: int = 200) -> Response:
    """A response body serialised by pydantic-core directly (the route declares the model for the schema)."""
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")
