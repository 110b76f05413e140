"""The door of the service: who may call it, from where, and with how large a body.

One ASGI middleware in front of every route, checks in this order:

1. Host (on loopback): the ``Host`` header must name this server (``127.0.0.1``, ``localhost`` or
   ``[::1]`` at its port). A web page that rebinds its own DNS name to 127.0.0.1 sends its name,
   and is refused (403).
2. Origin: a browser's ``Origin`` must be the server's own or one given with ``--cors-origin``
   (403), so a page the user happens to visit cannot post to the service through their browser,
   as ComfyUI guards it. Only the given origins get CORS headers and preflight answers.
3. Token: with ``--token``, every request but the static page needs ``Authorization: Bearer``
   (401). The page holds nothing and calls nothing by itself; it sends the token the user types.
4. Body: a declared ``Content-Length`` above the cap is refused before a byte is read (413); the
   routes count what they read too, for chunked uploads.

Every refusal is the service's one-line JSON error. Responses carry ``nosniff`` and ``no-store``;
the page gets a content security policy that allows its own files only.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import urlsplit

from ..runtime import is_loopback
from .config import ServeConfig
from .inputs import ApiError, body_too_large

#: Paths served without a token: the static page and its files, the API's description (nothing secret).
PUBLIC_PATHS = ("/", "/docs", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


class Guard:
    """ASGI middleware applying :class:`~idc_lite.serve.config.ServeConfig`'s access rules."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.token = config.token.encode() if config.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        cors_origin = None
        try:
            cors_origin = self._check_origin(scope, headers)
            if scope["method"] == "OPTIONS" and cors_origin and "access-control-request-method" in headers:
                return await _send(send, 204, b"", self._cors_headers(cors_origin))
            if self.token and not _public(path) and scope["method"] != "OPTIONS":
                self._check_token(headers.get("authorization", ""))
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.config.max_body_bytes:
                raise body_too_large(int(declared), self.config.max_body_bytes)
        except ApiError as exc:
            extra = self._cors_headers(cors_origin) if cors_origin else []  # a page it allows may read why
            return await _send(send, exc.status, json.dumps(exc.body()).encode(),
                               [(b"content-type", b"application/json"), *extra,
                                *((k.encode(), v.encode()) for k, v in exc.headers.items())])

        page = _public(path)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                added = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if page:
                    added.append((b"content-security-policy", PAGE_POLICY.encode()))
                else:
                    added.append((b"cache-control", b"no-store"))
                if cors_origin:
                    added += self._cors_headers(cors_origin)
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    # ------------------------------------------------------------------ the checks
    def _own_hosts(self, port: int) -> set[str]:
        """``host:port`` values that name this server on loopback."""
        host = self.config.host.lower()
        names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host and not host.startswith("[") else host}
        return {f"{name}:{port}" for name in names} | (names if port == 80 else set())

    def _check_origin(self, scope, headers: dict[str, str]) -> str | None:
        """Refuse a foreign Host or Origin; return the Origin when it is one of the CORS origins."""
        host = headers.get("host", "").lower()
        port = (scope.get("server") or (None, self.config.port))[1]  # the port it really listens on
        if self.config.loopback and host not in self._own_hosts(port):
            raise ApiError(403, "host", f"{host[:100]!r} is not this server's name; call it as "
                           f"http://127.0.0.1:{port} (a web page must not reach it through a browser)")
        origin = headers.get("origin")
        if origin is None:
            return None
        normalized = origin.rstrip("/").lower()
        if normalized in self.config.origins:
            return origin
        parts = urlsplit(normalized)
        own_page = parts.scheme == "http" and parts.netloc == host
        if own_page and (not self.config.loopback or is_loopback(parts.hostname or "")):
            return None  # the server's own page
        raise ApiError(403, "origin", f"{origin[:100]!r} may not call this server; allow a web origin with "
                       "--cors-origin")

    def _check_token(self, authorization: str) -> None:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "authorization", "this server needs 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token):
            raise ApiError(401, "authorization", "wrong token", {"WWW-Authenticate": "Bearer"})

    def _cors_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
                (b"access-control-allow-methods", CORS_METHODS.encode()),
                (b"access-control-allow-headers", CORS_HEADERS.encode()),
                (b"access-control-max-age", b"600")]


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _send(send, status: int, body: bytes, headers) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
