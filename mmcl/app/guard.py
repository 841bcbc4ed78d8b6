"""Exposure limits for the app's HTTP server: requests from other web origins and image URLs are refused.

Gradio's CORS middleware only withholds the response from a foreign page's script; a cross-origin form POST
(an upload) is still processed. `OriginGuard` answers 403 before the request reaches Gradio instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
URL_PREFIXES = ("http://", "https://", "ftp://", "data:")


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
                await send(
                    {"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]}
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def refuse_urls(payload: Any) -> None:
    """Raise a UserError when an image input holds a URL (Gradio would try to fetch it, then fail vaguely)."""
    from mmcl.utils import UserError

    text = payload if isinstance(payload, str) else getattr(payload, "url", None) or getattr(payload, "path", None)
    if isinstance(text, str) and text.strip().lower().startswith(URL_PREFIXES):
        path = getattr(payload, "path", "") or ""
        if isinstance(payload, str) or not path or path.lower().startswith(URL_PREFIXES):
            raise UserError("image URLs are not fetched: upload the image file instead")


def parse_auth(value: str) -> tuple[str, str]:
    """'user:password' -> (user, password) for Gradio's login page."""
    from mmcl.utils import UserError

    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password
