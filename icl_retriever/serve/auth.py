"""Bearer-token authentication: with a token configured, every path but ``/healthz`` needs
``Authorization: Bearer <token>``. Only the token's SHA-256 is kept, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from icl_retriever.serve.errors import error_response

#: Paths answered without a token: a load balancer's liveness probe carries none.
OPEN_PATHS = frozenset({"/healthz"})


class BearerToken:
    """The configured token, as its digest; ``None`` means no token (then writes are refused)."""

    def __init__(self, token: str | None) -> None:
        if token is not None and not token.strip():
            raise ValueError("the API token is empty")
        if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
            raise ValueError("the API token must be printable ASCII without spaces (it travels in an HTTP header)")
        self._digest = None if token is None else hashlib.sha256(token.encode("utf-8")).digest()

    @property
    def configured(self) -> bool:
        """Whether a token is required (and writes are allowed)."""
        return self._digest is not None

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (always, when none is configured)."""
        if self._digest is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # digests of equal length: the comparison's time does not depend on the token or the guess
        return hmac.compare_digest(hashlib.sha256(given.strip().encode("latin-1", "replace")).digest(), self._digest)

    def __repr__(self) -> str:
        return f"BearerToken(configured={self.configured})"  # never the token


class AuthMiddleware:
    """Answers 401 (JSON, ``WWW-Authenticate: Bearer``) before the app sees a request without the token."""

    def __init__(self, app: ASGIApp, token: BearerToken) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token.configured or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.token.accepts(Headers(scope=scope).get("authorization")):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                  "Authorization", {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
