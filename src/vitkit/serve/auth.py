"""Who may call the service: an API key as a bearer token, and the web origins allowed to
call it from a browser.

With a key, every request needs `Authorization: Bearer KEY` except those for the page and
its files, the health checks and the API's description (`PUBLIC_PATHS`); the others get 401
JSON with `WWW-Authenticate: Bearer`, before their body is read. Routes not listed there are
protected by default, so an endpoint added later is not left open by mistake. Cross-origin
requests are refused by browsers unless origins are named (`cors_origins`).
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Open to anyone: the page and its files, the health checks and the API's description.
PUBLIC_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
PUBLIC_PREFIXES = ("/static/",)


class BearerAuth:
    """ASGI middleware: a request for any path but the public ones without the header
    `Authorization: Bearer KEY` gets 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        check_api_key(api_key)
        self.app, self._digest = app, _digest(api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _public(scope["path"]) or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        message = (
            "this service needs an API key: send the header 'Authorization: Bearer <key>'"
            if _credentials(scope) is None
            else "the API key is wrong"
        )
        response = JSONResponse({"error": message}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        token = _credentials(scope)
        # Digests of equal length: compare_digest's time then reveals nothing, not even the
        # key's length.
        return token is not None and hmac.compare_digest(_digest(token), self._digest)


def add_access_control(app: FastAPI, api_key: str | None, cors_origins: list[str] | None) -> None:
    """The key check (with `api_key`) and CORS for `cors_origins` (none without them).

    CORS goes outside the key check: a browser's preflight carries no Authorization header,
    and a 401 needs the CORS headers too for the page on the other origin to read it.
    """
    check_access(api_key, cors_origins)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            # What /v1/explain and a 503 tell a client in headers, readable by its script.
            expose_headers=["X-Labels", "X-Latency-Ms", "Retry-After"],
        )


def check_access(api_key: str | None, cors_origins: list[str] | None) -> None:
    """Raises ValueError for a key or an origin that `add_access_control` would refuse."""
    if api_key is not None:
        check_api_key(api_key)
    for origin in cors_origins or []:
        check_origin(origin)


def check_api_key(key: str) -> None:
    """Raises ValueError for a key that cannot travel as a bearer token: empty, or with
    spaces, control or non-ASCII characters."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise ValueError("an API key must be a non-empty string of printable ASCII without spaces")


def check_origin(origin: str) -> None:
    """Raises ValueError unless `origin` is `*` or a web origin, SCHEME://HOST[:PORT], as a
    browser sends it (a trailing slash or a path would never match)."""
    if origin == "*":
        return
    parts = urlsplit(origin)
    if not parts.scheme or not parts.netloc or origin != f"{parts.scheme}://{parts.netloc}":
        raise ValueError(
            f"CORS origin {origin!r} is not SCHEME://HOST[:PORT] (e.g. https://app.example.com, "
            "no path or trailing slash)"
        )


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _credentials(scope: Scope) -> bytes | None:
    """The token of a request's `Authorization: Bearer TOKEN` header, if it has one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()
