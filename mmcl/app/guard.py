"""Exposure limits for the app's HTTP server: other web origins, unlisted endpoints and image URLs are refused.

Gradio's CORS middleware only withholds the response from a foreign page's script; a cross-origin form POST
(an upload) is still processed. `OriginGuard` answers 403 before the request reaches Gradio instead.
Gradio resolves `/gradio_api/call/NAME` (and `/run/NAME`, `/api/NAME`) for any event, listed or not;
`NamedCallGuard` answers 404 for every name that is not part of the documented API.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
URL_PATTERN = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|data:)", re.IGNORECASE)
NAMED_CALL = re.compile(r"/gradio_api/(?:call/v2|call|run|api)/([^/]+)")
URL_MESSAGE = "image URLs are not fetched: download the image and upload the file instead"


async def _refuse(send: Callable, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


class OriginGuard:
    """ASGI middleware: a request whose `Origin` header names another site is refused with 403.

    Args:
        app: the wrapped ASGI app.
        allowed: extra origins (`https://example.org`) accepted besides the server's own host.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed}

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allowed:
            return True
        parts = urlsplit(origin)
        if parts.netloc and parts.netloc == host.lower():  # the page was served by this server
            return True
        own_port = host.rsplit(":", 1)[-1] if ":" in host else ""
        local = (parts.hostname or "") in {h.strip("[]") for h in LOCAL_HOSTS}
        host_local = host.lower().rsplit(":", 1)[0].strip("[]") in {h.strip("[]") for h in LOCAL_HOSTS}
        return local and host_local and str(parts.port or "") == own_port

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            origin = headers.get("origin")
            if origin is not None and not self.origin_ok(origin, headers.get("host", "")):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"cross-origin request refused (start the app with --allow-origin to permit one)"
                await _refuse(send, 403, body)
                return
        await self.app(scope, receive, send)


class NamedCallGuard:
    """ASGI middleware: `/gradio_api/call|run|api/NAME` answers 404 unless NAME is a documented endpoint.

    Gradio's `api_visibility="private"` hides an event from the API page and from `gradio_client`, but its
    routes still find the event by its (generated) name. The page itself calls events through the queue by
    index, within its own session, so refusing named calls to anything unlisted takes nothing from the UI.

    Args:
        app: the wrapped ASGI app.
        public: the api names (without '/') that may be called by name.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], public: Iterable[str] = ()) -> None:
        self.app = app
        self.public = frozenset(public)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            match = NAMED_CALL.search(scope.get("path", ""))
            if match and match.group(1) not in self.public:
                await _refuse(send, 404, b"no such API endpoint")
                return
        await self.app(scope, receive, send)


def refuse_urls(path: str | None) -> None:
    """Raise a UserError when an image input names a URL: the app never fetches one for a visitor.

    Gradio would download an http(s) URL given in place of an upload (a server-side request on a visitor's
    behalf) and report any failure as a generic "upstream Gradio app has raised an exception".
    """
    from mmcl.utils import UserError

    if isinstance(path, str) and URL_PATTERN.match(path):
        raise UserError(URL_MESSAGE)


def parse_auth(value: str) -> tuple[str, str]:
    """'user:password' -> (user, password) for Gradio's login page."""
    from mmcl.utils import UserError

    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password
