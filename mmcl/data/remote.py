"""Opening shards as byte streams: local files, http(s) and fsspec stores with retries and backoff, `pipe:`.

An http(s) shard is read with `urllib` as one `GET`; a stalled read (no byte for `timeout` seconds), a
connection dropped before `Content-Length`, a 5xx/429 answer, a refused connection or a server slower than
`min_speed` is retried up to `retries` times with exponential backoff, each retry asking for the rest with a
`Range` header (a server that ignores ranges is answered by discarding the bytes already read; a 206 answer
starts where its `Content-Range` says, checked, never assumed). What still fails raises `ShardUnreadable` with a
reason the reader counts. A shard's end is checked by the tar reader (`mmcl.data.reader`: two zero blocks), so
a body cut at a member boundary, with or without a `Content-Length`, is never read as a shorter shard. The
retrying is `RetryingStream`'s, shared with the fsspec stores (`mmcl.data.store`). `mmcl.data.reader.open_at`
opens any of them at a byte offset (resume seeks there).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("mmcl.data")

HTTP_PREFIXES = ("http://", "https://")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class FetchOptions:
    """How hard to try reading a remote shard (`data.http_*` in the config).

    Attributes:
        timeout: seconds a connect or a read may wait for a byte before it counts as stalled.
        retries: further attempts after a failed open or read of one shard (0 = give up at once).
        backoff: seconds before the first retry; doubled for each further one, capped at `max_backoff`.
        max_backoff: the longest wait between two attempts.
        min_speed: bytes/s a shard must arrive at, measured over the time spent waiting for it in windows of
            `timeout` seconds (as curl's low-speed limit): a server that trickles a byte now and then never
            stalls a read for `timeout`, yet would take days. A slower window counts as a failed read (retried
            from where it stopped, then `<scheme>_slow`); time the reader spends elsewhere never counts. 0 = off.
    """

    timeout: float = 30.0
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    min_speed: float = 1024.0

    def wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt)


class ShardUnreadable(OSError):
    """A shard that could not be opened or read to its end, after the retries. `reason` is a skip reason."""

    def __init__(self, url: str, reason: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url, self.reason, self.detail = url, reason, detail


class TooSlow(OSError):
    """A window of waiting in which a shard arrived slower than `FetchOptions.min_speed`."""


class SpeedCheck:
    """The rate a shard arrives at while its reader waits for it, checked once per window of `options.timeout`
    seconds of waiting (see `FetchOptions.min_speed`). `strikes` counts slow windows in a row."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self.waited, self.got, self.strikes = 0.0, 0, 0

    def restart(self) -> None:
        """A new connection: a new window (the strikes stay until a window passes)."""
        self.waited, self.got = 0.0, 0

    def record(self, n: int, seconds: float) -> None:
        """`n` bytes arrived after `seconds` of waiting; raises TooSlow when a window closes too slow."""
        if self.options.min_speed <= 0:
            return
        self.waited += seconds
        self.got += n
        if self.waited < self.options.timeout:
            return
        rate, slow = self.got / self.waited, self.got < self.options.min_speed * self.waited
        self.restart()
        if not slow:
            self.strikes = 0
            return
        self.strikes += 1
        raise TooSlow(f"{rate:.0f} bytes/s, below the minimum of {self.options.min_speed:g} bytes/s")


class BadRange(http.client.HTTPException):
    """A 206 answer whose Content-Range is missing, unreadable or starts past the byte asked for."""


def _content_range(header: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a `Content-Range: bytes FIRST-LAST/TOTAL` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if match is None:
        raise BadRange(f"a 206 answer with Content-Range {header!r}")
    return int(match[1]), None if match[3] == "*" else int(match[3])


def _failure(exn: BaseException) -> tuple[str, bool]:
    """(skip reason, worth retrying) for an exception raised while opening or reading over http."""
    if isinstance(exn, urllib.error.HTTPError):
        return f"http_{exn.code}", exn.code in _RETRY_STATUS
    if isinstance(exn, BadRange):
        return "http_bad_range", True
    if isinstance(exn, TooSlow):
        return "http_slow", True
    if isinstance(exn, TimeoutError) or "timed out" in str(exn):
        return "http_timeout", True
    if isinstance(exn, (http.client.IncompleteRead, ConnectionError, http.client.HTTPException, EOFError)):
        return "http_dropped", True
    if isinstance(exn, urllib.error.URLError):
        reason = exn.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return "http_timeout", True
        return "http_unreachable", True
    return "http_error", True


class RetryingStream(io.RawIOBase):
    """A read-only stream of one remote shard from byte `offset`, re-opened at the byte it stopped at where an
    open or a read fails, with backoff, until `options.retries` failures in a row; then `ShardUnreadable`.

    Subclasses open the source at `pos` (`_open_once`), read once from it (`_read_once`), close it
    (`_close_source`) and name a failure (`_failure`: skip reason, worth retrying). Each read is timed for
    `FetchOptions.min_speed`.

    Args:
        url: the shard's URL.
        offset: first byte to read.
        options: timeouts and retries.
    """

    def __init__(self, url: str, offset: int = 0, options: FetchOptions | None = None) -> None:
        super().__init__()
        self.url, self.pos, self.options = url, offset, options or FetchOptions()
        self.end: int | None = None  # total size once the source has told it
        self.retried = 0
        self.speed = SpeedCheck(self.options)
        self._connect()

    def readable(self) -> bool:
        return True

    def _open_once(self) -> None:
        raise NotImplementedError

    def _read_once(self, n: int) -> bytes:
        raise NotImplementedError

    def _close_source(self) -> None:
        raise NotImplementedError

    def _failure(self, exn: BaseException) -> tuple[str, bool]:
        raise NotImplementedError

    def _connect(self) -> None:
        """Open (or re-open at `pos`), retrying with backoff; raises ShardUnreadable when it keeps failing."""
        self._close_source()
        for attempt in range(self.options.retries + 1):
            try:
                self._open_once()
                self.speed.restart()
                return
            except Exception as exn:  # noqa: BLE001 (classified below; anything else is a bug worth retrying)
                self._close_source()
                reason, retry = self._failure(exn)
                if not retry or attempt == self.options.retries:
                    raise ShardUnreadable(self.url, reason, f"{type(exn).__name__}: {exn}") from None
                self.retried += 1
                wait = self.options.wait(attempt)
                log.warning("%s: %s (%s); retry %d in %.1fs", self.url, reason, exn, attempt + 1, wait)
                time.sleep(wait)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if not len(buffer):
            return 0
        for attempt in range(self.options.retries + 1):
            if self.closed_source:
                self._connect()
            try:
                t0 = time.monotonic()
                data = self._read_once(len(buffer))
                self.speed.record(len(data), time.monotonic() - t0)
                n = len(data)
                if n == 0 and self.end is not None and self.pos < self.end:
                    raise http.client.IncompleteRead(b"", self.end - self.pos)
                buffer[:n] = data
                self.pos += n
                return n
            except ShardUnreadable:
                raise
            except Exception as exn:  # noqa: BLE001
                reason, retry = self._failure(exn)
                self._close_source()
                tries = max(attempt, self.speed.strikes - 1)  # slow windows in a row count across reads
                if not retry or tries >= self.options.retries:
                    raise ShardUnreadable(self.url, reason, f"{type(exn).__name__} at byte {self.pos}: {exn}") from None
                self.retried += 1
                wait = self.options.wait(tries)
                log.warning("%s: %s at byte %d; retry %d in %.1fs", self.url, reason, self.pos, tries + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    @property
    def closed_source(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self._close_source()
        super().close()


class HttpStream(RetryingStream):
    """An http(s) shard: one `GET` with a `Range` header from `pos`, its `Content-Range` checked."""

    _response: http.client.HTTPResponse | None = None

    def _open_once(self) -> None:
        headers = {"User-Agent": "mmcl", "Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        response = urllib.request.urlopen(
            urllib.request.Request(self.url, headers=headers), timeout=self.options.timeout
        )
        self._response = response
        length = response.headers.get("Content-Length")
        if response.status == 206:  # where the body starts is what Content-Range says, not what was asked
            first, total = _content_range(response.headers.get("Content-Range"))
            if first > self.pos:
                raise BadRange(f"asked for bytes from {self.pos}, the answer starts at byte {first}")
            self.end = total if total is not None else (first + int(length) if length is not None else None)
            skip = self.pos - first
        else:  # a full answer: the server ignored the range, so skip what was read already
            self.end = int(length) if length is not None else None
            skip = self.pos
        while skip:
            chunk = response.read(min(skip, 1 << 20))
            if not chunk:
                raise http.client.IncompleteRead(b"", skip)
            skip -= len(chunk)

    def _read_once(self, n: int) -> bytes:
        return self._response.read1(n)  # type: ignore[union-attr] (one socket read: the rate is seen as it is)

    @property
    def closed_source(self) -> bool:
        return self._response is None

    def _close_source(self) -> None:
        if self._response is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                self._response.close()
            self._response = None

    def _failure(self, exn: BaseException) -> tuple[str, bool]:
        return _failure(exn)


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
WEBDATASET_SCHEMES = ("ais",)  # read through webdataset's command-line openers, as `pipe:` is


REMOTE_PREFIXES = ("pipe:", *HTTP_PREFIXES, "ais://")  # and every fsspec store (`is_store`)


def is_remote(url: str) -> bool:
    """Whether `url` is read from elsewhere (pipe:, http(s), s3://, gs://, any fsspec store) rather than from disk."""
    return url.startswith(REMOTE_PREFIXES) or is_store(url)


def is_store(url: str) -> bool:
    """Whether `url` names a shard in an fsspec store: any `scheme://` but http(s), file and webdataset's own."""
    match = _SCHEME.match(url)
    return match is not None and match[1].lower() not in ("http", "https", "file", *WEBDATASET_SCHEMES)
