"""Errors a request can cause, answered as ``{"error": {"field": ..., "message": ...}}`` and nothing else:
no stack trace reaches a client; server errors are logged with theirs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger("icl_retriever.serve")


class ErrorDetail(BaseModel):
    """What went wrong: the request field at fault (dotted, e.g. ``filter.lang``), if one is."""

    field: str | None = Field(None, description="the request field at fault, dotted (null: the request as a whole)")
    message: str = Field(description="what is wrong, for a person")


class ErrorBody(BaseModel):
    """Every 4xx / 5xx response body."""

    error: ErrorDetail


class RequestError(Exception):
    """A request the server refuses: its status, the field at fault and why."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_response(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """The JSON error response."""
    body = ErrorBody(error=ErrorDetail(field=field, message=message))
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as a dotted request field: without the leading ``body`` and without the
    union branch pydantic adds (``min_score.float`` is ``min_score``); list positions stay (``queries.3``)."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    keep = [str(parts[0])] + [str(p) for p in parts[1:] if isinstance(p, int)]
    return ".".join(keep)


def validation_message(err: dict[str, Any]) -> str:
    """A pydantic error's message: the library's own (a validator's ``ValueError``) where there is one."""
    cause = (err.get("ctx") or {}).get("error")
    if cause is not None:
        return str(cause)
    return str(err["msg"])


def install_error_handlers(app: FastAPI, explain: Callable[[str, Any], str | None] | None = None) -> None:
    """Answer every refusal and failure with :class:`ErrorBody`.

    Args:
        explain: ``(field, value) -> message`` for an invalid field, where the library says it better
            than pydantic's type error (the search controls' own validators).
    """

    @app.exception_handler(RequestError)
    async def _refused(_: Request, exc: RequestError) -> Response:
        return error_response(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            where = err["loc"][-1] if len(err.get("loc", ())) > 1 else "?"
            reason = (err.get("ctx") or {}).get("error", err["msg"])
            return error_response(422, f"the body is not valid JSON (character {where}: {reason})", "body")
        field = field_of(err.get("loc", ()))
        better = explain(field, err.get("input")) if explain is not None and field is not None else None
        return error_response(422, better or validation_message(err), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        field = "body" if exc.status_code == 413 else None
        return error_response(exc.status_code, str(exc.detail), field, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (logged by the server)")


__all__ = ["ErrorBody", "ErrorDetail", "RequestError", "error_response", "field_of", "install_error_handlers",
           "validation_message"]
