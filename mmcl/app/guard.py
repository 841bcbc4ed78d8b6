"""Exposure limits for the app's HTTP server: other host names, other web origins, unlisted endpoints and image
URLs are refused.

A page on a name the attacker controls can point that name at 127.0.0.1 (DNS rebinding): the browser then
treats the app as the attacker's own origin, so the Origin check passes. `HostGuard` answers 403 to any `Host`
that is not the bound address, a localhost name or a name the user allowed (`--allow-host`).
Gradio's CORS middleware only withholds the response from a foreign page's script; a cross-origin form POST
(an upload) is still processed. `OriginGuard` answers 403 before the request reaches Gradio instead.
Gradio resolves `/gradio_api/call/NAME` (and `/run/NAME`, `/api/NAME`) for any event, listed or not;
`NamedCallGuard` answers 404 for every name that is not part of the documented API.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmcl.utils import UserError

log = logging.getLogger("mmcl")

LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
URL_PATTERN = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|data:)", re.IGNORECASE)
NAMED_CALL = re.compile(r"/gradio_api/(?:call/v2|call|run|api)/([^/]+)")
URL_MESSAGE = "image URLs are not fetched: download the image and upload the file instead"


async def _refuse(send: Callable, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def _refuse_scope(scope: dict[str, Any], send: Callable, body: bytes) -> None:
    """403 for an HTTP request; a policy-violation close for a websocket."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
    else:
        await _refuse(send, 403, body)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def split_host(value: str) -> tuple[str, int | None] | None:
    """'Name:8080' -> ('name', 8080); '[::1]:80' -> ('::1', 80); None when it is no valid host[:port]."""
    try:
        parts = urlsplit("//" + value.strip())
        if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username is not None:
            return None
        return parts.hostname.lower(), parts.port  # .port raises ValueError on 'host:abc' or a port > 65535
    except ValueError:
        return None


def _allowed_name(value: str) -> str:
    """The host name of an `--allow-host` value: 'box.lan', 'box.lan:7860' (as an address bar shows it, the port
    ignored: the guard is about names) or '[fd00::5]:80'; a URL or anything else is refused in one line."""
    parsed = split_host(value)
    if parsed is None:
        raise UserError(f"--allow-host '{value[:200]}': not a host name (give NAME or NAME:PORT, e.g. box.lan:7860)")
    return parsed[0]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _OncePerValue:
    """Logs one line per distinct refused value (a bounded set), so a hostile page cannot flood the log."""

    def __init__(self, limit: int = 256) -> None:
        self.seen: set[str] = set()
        self.limit = limit

    def __call__(self, what: str, value: str) -> None:
        key = f"{what}\0{value}"
        if key not in self.seen and len(self.seen) < self.limit:
            self.seen.add(key)
            log.warning("app: refused a request with %s %r", what, value[:200])


class HostGuard:
    """ASGI middleware: a request whose `Host` names anything but this server is refused with 403.

    Accepted: localhost names (localhost, 127.0.0.1, ::1), the bound address, the names in `allowed`, and,
    when the server listens on every interface (0.0.0.0 or ::), any IP address: a literal address cannot be
    rebound, only a name can. A request without a Host header comes from no browser and passes.

    Args:
        app: the wrapped ASGI app.
        bound: the address the server listens on (`--host`).
        allowed: extra host names (`--allow-host`).
        share_url: returns the public share link once there is one (known only after the server started); its
            host is accepted too.
    """

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        bound: str = "127.0.0.1",
        allowed: Iterable[str] = (),
        share_url: Callable[[], str | None] | None = None,
    ) -> None:
        self.app = app
        self.bound = bound.strip().strip("[]").lower()
        self.allowed = {_allowed_name(a) for a in allowed}
        self.share_url = share_url
        self.report = _OncePerValue()

    def host_ok(self, value: str) -> bool:
        parsed = split_host(value)
        if parsed is None:
            return False
        name = parsed[0]
        if name in LOCAL_NAMES or name == self.bound or name in self.allowed:
            return True
        share = self.share_url() if self.share_url else None
        if share and name == (urlsplit(share).hostname or "").lower():
            return True
        return self.bound in WILDCARDS and _is_ip(name)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            host = _headers(scope).get("host")
            if host is not None and not self.host_ok(host):
                self.report("Host", host)
                name = (split_host(host) or ("NAME",))[0]
                body = (
                    f"host '{host[:200]}' refused: start the app with --allow-host {name} to serve it under that name"
                )
                await _refuse_scope(scope, send, body.encode("utf-8", "replace"))
                return
        await self.app(scope, receive, send)


class OriginGuard:
    """ASGI middleware: a request whose `Origin` header names another site is refused with 403.

    Args:
        app: the wrapped ASGI app.
        allowed: extra origins (`https://example.org`) accepted besides the server's own host.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed}
        self.report = _OncePerValue()

    def origin_ok(self, origin: str, host: str) -> bool:
        """Whether a page of `origin` may call this server, reached as `host`; a malformed origin may not."""
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed:
            return True
        try:
            parts = urlsplit(origin)
            port = parts.port  # ValueError for 'http://127.0.0.1:7861.evil.example' or a port > 65535
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.username is not None:
            return False
        if parts.netloc and parts.netloc == host.strip().lower():  # the page was served by this server
            return True
        own = split_host(host)
        if own is None:
            return False
        return (parts.hostname or "") in LOCAL_NAMES and own[0] in LOCAL_NAMES and port == own[1]

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = _headers(scope)
            origin = headers.get("origin")
            if origin is not None and not self.origin_ok(origin, headers.get("host", "")):
                self.report("Origin", origin)
                body = b"cross-origin request refused (start the app with --allow-origin to permit one)"
                await _refuse_scope(scope, send, body)
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


def body_limit(max_bytes: int) -> int:
    """The largest request body `BodyLimit` lets through: one image of `max_bytes` sent inline as base64, plus
    1 MiB for the other fields (labels, prompts)."""
    return max_bytes * 4 // 3 + 2**20


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before the app reads any of it.

    Gradio bounds multipart uploads (`max_file_size`, checked while streaming) but parses every JSON body whole,
    so an image sent inline (a `data:` URL in an API call) would be held in memory whatever its size. Uploads are
    left to Gradio's own check; every other body is counted here, declared (Content-Length) or chunked.

    Args:
        app: the wrapped ASGI app.
        limit: the largest body accepted, in bytes (`body_limit`).
        upload_path: the upload route, bounded by Gradio itself.
    """

    def __init__(
        self, app: Callable[..., Awaitable[None]], limit: int, upload_path: str = "/gradio_api/upload"
    ) -> None:
        self.app = app
        self.limit = limit
        self.upload_path = upload_path

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").rstrip("/") == self.upload_path:
            await self.app(scope, receive, send)
            return
        refusal = f"request body over the {self.limit:,} byte limit (set by --max-file-size)".encode()
        declared = _headers(scope).get("content-length")
        if declared is not None:  # uvicorn holds the client to it
            if not declared.isdigit() or int(declared) > self.limit:
                await _refuse(send, 413, refusal)
                return
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True  # chunked: read it here, at most `limit` bytes, then hand it on
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _refuse(send, 413, refusal)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def check_file_size(path: str | Path, max_bytes: int, name: str = "") -> None:
    """Refuse a file over `max_bytes` (a path can name a file no upload limit ever saw)."""
    from mmcl.utils import UserError

    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise UserError(f"{name or path}: cannot read the file ({e.strerror or e})") from None
    if size > max_bytes:
        raise UserError(f"{name or Path(path).name}: {size:,} bytes is more than the {max_bytes:,} byte limit")


def refuse_urls(path: str | None) -> None:
    """Raise a UserError when an image input names a URL: the app never fetches one for a visitor.

    Gradio would download an http(s) URL given in place of an upload (a server-side request on a visitor's
    behalf) and report any failure as a generic "upstream Gradio app has raised an exception".
    """
    from mmcl.utils import UserError

    if isinstance(path, str) and URL_PATTERN.match(path):
        raise UserError(URL_MESSAGE)


SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}  # Gradio's (binary) units


def parse_file_size(value: str | int) -> int:
    """'20mb', '512 KB', '1048576' -> bytes (Gradio's units, powers of 1024); a clear error for anything else."""
    from mmcl.utils import UserError

    text = str(value).replace(" ", "").upper()
    digits = len(text) - len(text.lstrip("0123456789"))
    unit = text[digits:]
    if not digits or unit not in SIZE_UNITS or int(text[:digits]) <= 0:
        raise UserError(f"--max-file-size takes a positive size like 20mb, 512kb or 1gb, got '{value}'")
    return int(text[:digits]) * SIZE_UNITS[unit]


def check_listen(host: str, port: int | None) -> None:
    """Fail in one line, before any model is loaded, when the server could not listen on host:port.

    Gradio reports a taken port as "Cannot find empty port" after the model has loaded, and a port out of range
    as an OverflowError traceback.
    """
    import socket

    from mmcl.utils import UserError

    if port is None:
        return
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        raise UserError(f"cannot listen on '{host}': not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing socket is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            reason = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise UserError(f"cannot listen on {host}:{port}: {reason} (choose another with --port N)") from None


def parse_auth(value: str) -> tuple[str, str]:
    """'user:password' -> (user, password) for Gradio's login page."""
    from mmcl.utils import UserError

    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password
