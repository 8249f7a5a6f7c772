"""Request limits: the body size (refused before it is read) and the sizes a request may ask for
(query length, k, fetch_k, queries in a batch), each refused with the field named."""

from __future__ import annotations

import string
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from icl_retriever.records import check_text
from icl_retriever.serve.errors import RequestError, error_response
from icl_retriever.serve.settings import ServeSettings


class BodyTooLarge(HTTPException):
    """Raised while a route reads a body that grew past the limit (FastAPI passes HTTP errors on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimitMiddleware:
    """Refuses a body over ``limit`` bytes: at once when ``Content-Length`` says so, else as soon as the
    bytes received pass it (a chunked body), never holding more than the limit.

    Not FastAPI's own ``max_body_size``: it answers in plain text, and this API answers every error as JSON.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            message = (f"the request body is larger than {self.limit} bytes" if length.isdigit()
                       else f"Content-Length {length[:40]!r} is not a number")
            await error_response(413 if length.isdigit() else 400, message, "body")(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def check_queries(queries: Sequence[str], settings: ServeSettings, field: str) -> None:
    """Each query non-empty, valid UTF-8 and at most ``max_query_chars`` long.

    Raises:
        RequestError: 422 naming the field (``query``, or ``queries.i``).
    """
    for i, query in enumerate(queries):
        where = field if field == "query" else f"{field}.{i}"
        if not query.strip():
            raise RequestError(422, "the query is empty", where)
        if len(query) > settings.max_query_chars:
            raise RequestError(422, f"the query has {len(query)} characters; the limit is {settings.max_query_chars}", where)
        try:
            check_text(query, "the query")
        except ValueError as exc:
            raise RequestError(422, str(exc), where) from None


def check_sizes(k: int, fetch_k: int | None, batch: int | None, settings: ServeSettings) -> None:
    """``k``, ``fetch_k`` and the batch within the server's limits.

    Raises:
        RequestError: 422 naming the field.
    """
    if k > settings.max_k:
        raise RequestError(422, f"k is {k}; the limit is {settings.max_k}", "k")
    if fetch_k is not None and fetch_k > settings.max_fetch_k:
        raise RequestError(422, f"fetch_k is {fetch_k}; the limit is {settings.max_fetch_k}", "fetch_k")
    if batch is not None and batch > settings.max_batch:
        raise RequestError(422, f"{batch} queries; the limit is {settings.max_batch} a request", "queries")
    if batch == 0:
        raise RequestError(422, "no queries", "queries")


def check_demo_format(demo_format: str | None, settings: ServeSettings) -> None:
    """A template of plain ``{field}`` replacements, no longer than a query.

    A format spec or conversion (``{output:>99999999}``, ``{input!r}``) is refused: a width alone would make
    the server build a huge string for every candidate demo.

    Raises:
        RequestError: 422 naming ``demo_format``.
    """
    if demo_format is None:
        return
    if len(demo_format) > settings.max_query_chars:
        raise RequestError(422, f"demo_format has {len(demo_format)} characters; the limit is {settings.max_query_chars}",
                           "demo_format")
    for _, name, spec, conversion in string.Formatter().parse(demo_format):  # parsed by SearchControls already
        if name is not None and (spec or conversion):
            raise RequestError(422, f"demo_format field {{{name}}}: the server takes plain {{field}} replacements, "
                                    "without a format spec or conversion", "demo_format")
