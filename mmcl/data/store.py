"""Shards in any fsspec store (s3://, gs://, hf://, az://, memory://, ...), read with range requests.

A shard is opened with fsspec's file object, which reads in blocks through range requests: a shard resumed at
byte N is opened and sought to N, nothing before N is fetched. Reads go through `RetryingStream`, so the
store gets what http(s) shards get (`mmcl.data.remote`): a read that waits longer than `timeout` (run in a
helper thread: a blocked store read cannot be interrupted, so it is abandoned), a dropped connection or any
other failure re-opens the file at the byte it stopped at, with backoff; a store that delivers slower than
`min_speed` is given up on the same way; what still fails is counted (`store_not_found`, `store_denied`,
`store_timeout`, `store_slow`, `store_error`). fsspec and the store's own package (s3fs, gcsfs, adlfs, ...)
are optional: `pip install 'mmcl[fsspec]'` and the store's package; without them a one-line error says so.
"""

from __future__ import annotations

import contextlib
import threading
from typing import IO, Any

from mmcl.data.remote import FetchOptions, RetryingStream, TooSlow
from mmcl.utils import UserError


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`.

    Raises:
        UserError: fsspec, or the package of the URL's store, is not installed, or fsspec knows no such store.
    """
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{url}: reading shards from a store needs fsspec: pip install 'mmcl[fsspec]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package the store needs
        raise UserError(f"{url}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # "Protocol not known"
        raise UserError(f"{url}: {e}") from None


def glob(pattern: str) -> list[str]:
    """The URLs in the store matching `pattern` (`*`, `?`, `[...]`), sorted, with the store's protocol."""
    fs, path = filesystem(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def _timed(fn: Any, timeout: float) -> Any:
    """`fn()`, or TimeoutError after `timeout` seconds (the thread running it is left to finish on its own)."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            result["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="mmcl-store-read").start()
    if not done.wait(timeout):
        raise TimeoutError(f"no answer from the store in {timeout:g}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class StoreStream(RetryingStream):
    """One shard of an fsspec store from byte `offset` (see the module docstring)."""

    _file: IO[bytes] | None = None

    def _open_once(self) -> None:
        fs, path = filesystem(self.url)

        def open_and_seek() -> IO[bytes]:
            f = fs.open(path, "rb")
            try:
                f.seek(self.pos)  # fsspec's buffered files read from here with range requests
            except BaseException:
                f.close()
                raise
            return f

        self._file = _timed(open_and_seek, self.options.timeout)
        size = getattr(self._file, "size", None)
        self.end = int(size) if isinstance(size, int) else None

    def _read_once(self, n: int) -> bytes:
        f = self._file
        return _timed(lambda: f.read(n), self.options.timeout)  # type: ignore[union-attr]

    @property
    def closed_source(self) -> bool:
        return self._file is None

    def _close_source(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            threading.Thread(target=_close_quietly, args=(f,), daemon=True).start()  # may hang like a read

    def _failure(self, exn: BaseException) -> tuple[str, bool]:
        if isinstance(exn, UserError):
            raise exn  # a missing package is the user's to fix, not a shard to skip
        if isinstance(exn, FileNotFoundError):
            return "store_not_found", False
        if isinstance(exn, PermissionError):
            return "store_denied", False
        if isinstance(exn, TooSlow):
            return "store_slow", True
        if isinstance(exn, TimeoutError):
            return "store_timeout", True
        return "store_error", True


def _close_quietly(f: IO[bytes]) -> None:
    with contextlib.suppress(Exception):  # a broken file may fail to close; it is dropped anyway
        f.close()


def open_store(url: str, offset: int = 0, options: FetchOptions | None = None) -> StoreStream:
    """A `StoreStream` of `url` from byte `offset` (wrap it in a buffered reader)."""
    return StoreStream(url, offset, options)
