"""Listing and reading shards: the one place that turns shard specs into raw samples.

Training (`mmcl.data.shards`), evaluation (`mmcl.eval.datasets`), the retrieval index (`mmcl.index`) and the
tokenizer trainer (`mmcl.data.tokenizer_train`) all list their inputs and read tars here:

* listing: `expand_shards` (one pattern: a folder of tars, a glob, a brace pattern, a URL, a store's URL with
  braces or a glob (s3://bucket/train/*.tar), `builtin:NAME`),
  `list_shards` (several specs in order, plus CLIP_benchmark's `ROOT/<split>/nshards.txt` layout) and
  `list_inputs` (shards and loose image files, for the index);
* reading: `read_samples` streams raw samples (`{'__key__', '__url__', '__offset__', ext: bytes}`) with
  Python's tarfile in stream mode (grouped by key as webdataset does; http(s) and fsspec stores through
  `mmcl.data.remote`, which retries), only ever reading the members `wanted_member` allows (images, `.txt`, `.json`, `.cls`: webdataset's
  default decoders would unpickle `.pyd` and `torch.load` `.pth`). An unreadable shard (0 bytes, not a tar,
  truncated, a damaged member header) is counted once as `unreadable_tar` and skipped, never raised;
* `file_sample` makes the same raw sample from a loose image file and its sidecar `.txt`.

Decoding a raw sample (image, caption, label) is `mmcl.data.decode`'s job.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import braceexpand

from mmcl.data.decode import IMAGE_EXTS, SkipCounter
from mmcl.data.remote import HTTP_PREFIXES, FetchOptions, HttpStream, ShardUnreadable, is_remote, is_store
from mmcl.data.store import open_store
from mmcl.utils import UserError

log = logging.getLogger("mmcl.data")

MAX_EXPANSIONS = 10_000_000  # shard names one pattern may expand to (a typo in a brace range: 10^8 names, 8 GB)
WANTED_SUFFIXES = {*IMAGE_EXTS, "txt", "json", "cls"}  # never pkl/pth/npy/pyd


def wanted_member(name: str) -> bool:
    """Whether to read a tar member: images, captions, json, labels; never pickles, torch or numpy files."""
    return name.rsplit(".", 1)[-1].lower() in WANTED_SUFFIXES


def is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS and path.is_file()


# ----------------------------------------------------------------------------- listing


def count_expansions(pattern: str) -> int:
    """How many names `braceexpand.braceexpand(pattern)` yields, counted without making them.

    Mirrors braceexpand's grammar (bash's): a pattern is a product of literals and `{...}` groups; a group is
    an integer or letter range (`{a..b}`, `{a..b..step}`), a comma sequence of patterns (summed), or else
    literal braces around a pattern. Backslash escapes a character.
    """
    from braceexpand import alphabet, char_range_re, int_range_re

    def group(expr: str) -> int:
        if m := int_range_re.match(expr):
            start, end, step = int(m[1]), int(m[2]), (int(m[3]) or 1) if m[3] else 1
            return len(range(start, end + 1, step) if start < end else range(start, end - 1, -step))
        if m := char_range_re.match(expr):
            step = (int(m[3]) or 1) if m[3] else 1
            start, end = alphabet.index(m[1]), alphabet.index(m[2])
            if start < end:
                return len(alphabet[start : end + 1 : step])
            return len(alphabet[start : (end or -len(alphabet)) - 1 : -step])
        parts = _split_top(expr, ",")
        return sum(count(p) for p in parts) if len(parts) > 1 else count(expr)

    def count(pat: str) -> int:
        total, depth, start, pos = 1, 0, 0, 0
        while pos < len(pat):
            if pat[pos] == "\\":
                pos += 2
                continue
            if pat[pos] == "{":
                depth, start = depth + 1, pos if depth == 0 else start
            elif pat[pos] == "}":
                depth -= 1
                if depth == 0:
                    total *= group(pat[start + 1 : pos])
            pos += 1
        if depth != 0:
            raise UserError(f"shard pattern '{pattern}': unbalanced braces")
        return total

    return count(pattern)


def _split_top(expr: str, sep: str) -> list[str]:
    """`expr` split at the `sep` characters outside braces (and not escaped)."""
    parts, depth, start, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += (c == "{") - (c == "}")
        if c == sep and depth == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0:
        return [expr]  # braceexpand reads an unbalanced sequence as no sequence
    return [*parts, expr[start:]]


def _brace_expand(pattern: str) -> list[str]:
    """braceexpand's names for `pattern`, refused in one line when there would be more than MAX_EXPANSIONS."""
    n = count_expansions(pattern)
    if n > MAX_EXPANSIONS:
        raise UserError(
            f"shard pattern '{pattern}' expands to {n:,} names, more than {MAX_EXPANSIONS:,}: check its brace ranges"
        )
    return list(braceexpand.braceexpand(pattern))


def expand_shards(pattern: str) -> list[str]:
    """A directory (all its .tar), a glob, a brace pattern or `builtin:NAME` -> sorted shard list.

    A pattern that matches nothing is a clear error naming it.
    """
    from mmcl.data.builtin import builtin_dir, is_builtin

    if is_builtin(pattern):
        pattern = str(builtin_dir(pattern))
    if is_store(pattern):  # a bucket: checked now (fsspec and the store's package), globbed there
        from mmcl.data import store

        store.filesystem(pattern)
        names = _brace_expand(pattern)
        if not any(c in pattern for c in "*?["):
            return names
        found = [url for name in names for url in store.glob(name)]
        if not found:
            raise UserError(f"shard pattern '{pattern}' matches no file in its store")
        return found
    if is_remote(pattern):
        return _brace_expand(pattern)
    path = Path(pattern)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    else:
        found = []
        for expanded in _brace_expand(pattern):
            found.extend(sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded])
        missing = [p for p in found if not os.path.exists(p)]
        if missing:
            raise UserError(f"shard pattern '{pattern}': {len(missing)} file(s) not found, e.g. {missing[0]}")
    if not found:
        raise UserError(f"shard pattern '{pattern}' matches no .tar file")
    return found


def list_shards(specs: str | Sequence[str], split: str = "test") -> list[str]:
    """Shard URLs for one spec or several, in the order given.

    A spec is a CLIP_benchmark root (`ROOT/<split>/nshards.txt` lists `ROOT/<split>/{0..n-1}.tar`, read in
    that numeric order), a folder whose tars sit in its `<split>` sub-folder, or anything `expand_shards`
    takes.

    Raises:
        UserError: a spec that matches no tar file.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise UserError("no shards given")
    urls: list[str] = []
    for spec in specs:
        path = Path(spec)
        nshards = path / split / "nshards.txt"
        if nshards.is_file():  # CLIP_benchmark layout
            found = [str(path / split / f"{i}.tar") for i in range(int(nshards.read_text().strip()))]
            missing = [u for u in found if not os.path.isfile(u)]
            if not found or missing:
                raise UserError(f"no shard found: {nshards} lists {len(found)} shard(s), {len(missing)} missing")
            urls.extend(found)
            continue
        if path.is_dir() and not any(path.glob("*.tar")) and (path / split).is_dir():
            spec = str(path / split)
        try:
            urls.extend(expand_shards(spec))
        except UserError as e:
            raise UserError(f"no shard found: {e}") from None
    return urls


def list_inputs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """('shard', url) or ('file', path) per input, in the order given, for readers that also take loose images.

    A spec is an image file, a folder of shards, a folder of images (searched recursively; captions from
    sidecar `.txt` files) or anything `expand_shards` takes.

    Raises:
        UserError: a spec that names nothing readable.
    """
    items: list[tuple[str, str]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and not any(path.glob("*.tar")):
            files = [str(f) for f in sorted(path.rglob("*")) if is_image_file(f)]
            if not files:
                raise UserError(f"{spec}: no .tar shards and no images in this folder")
            items.extend(("file", f) for f in files)
        elif is_image_file(path):
            items.append(("file", str(path)))
        else:
            try:
                items.extend(("shard", url) for url in expand_shards(spec))
            except UserError as e:
                raise UserError(f"{spec}: no such shard, image or folder ({e})") from None
    return items


def _read_counts(directory: Path) -> dict[str, int]:
    """Sample counts per shard from mmcl/webdataset `sizes.json` or img2dataset `*_stats.json`."""
    sizes = directory / "sizes.json"
    if sizes.is_file():
        return {str(directory / name): int(n) for name, n in json.loads(sizes.read_text()).items()}
    counts = {}
    for stats in directory.glob("*_stats.json"):
        data = json.loads(stats.read_text())
        tar = directory / (stats.name[: -len("_stats.json")] + ".tar")
        counts[str(tar)] = int(data.get("successes", data.get("count", 0)))
    return counts


def count_samples(shards: list[str]) -> int | None:
    """Total samples in `shards` from the stats beside them; None if any shard is not covered."""
    counts: dict[str, int] = {}
    for directory in {Path(s).parent for s in shards if not is_remote(s)}:
        counts.update(_read_counts(directory))
    try:
        return sum(counts[str(Path(s))] for s in shards)
    except KeyError:
        return None


# ----------------------------------------------------------------------------- reading


def read_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    select: Callable[[str], bool] = wanted_member,
    options: FetchOptions | None = None,
    start_offset: int = 0,
) -> Iterator[dict[str, Any]]:
    """Raw samples `{'__key__', '__url__', '__offset__', ext: bytes, ...}` of the shards `urls`, in order, streaming.

    `__offset__` is the byte offset of the sample's first tar header in its shard (-1 in a compressed tar):
    `read_sample_at` and a resumed stream seek there.

    Args:
        urls: shard paths or URLs (any iterable, e.g. an endless resampled stream).
        counter: receives one skip per shard that cannot be opened or read to its end: `unreadable_tar`
            (0 bytes, not a tar, truncated, a damaged member header: every tar must end in its two end-of-archive
            blocks) or, for http(s) shards after the retries of `options`,
            `http_<status>`, `http_timeout`, `http_dropped`, `http_unreachable`, `http_slow`, `http_bad_range`, and
            for fsspec stores `store_not_found`, `store_denied`, `store_timeout`, `store_slow`, `store_error`
            (each such shard is logged by URL).
            The complete samples read before the damage are kept, the one being read when it broke off is dropped.
        select: which members to read (by file name); must never admit pickles (see `wanted_member`).
        options: timeouts, retries and minimum speed for http(s) and store shards.
        start_offset: byte offset to start the first shard at (a sample boundary recorded in `__offset__`).
    """
    for i, url in enumerate(urls):  # one shard at a time, so damage is counted once per shard
        offset = start_offset if i == 0 else 0
        errors: list[Exception] = []
        last = None
        try:
            with open_at(url, offset, options) as stream:
                for sample in _samples(stream, url, offset, select, errors):
                    if last is not None:
                        yield last
                    last = sample
        except UserError:  # not the shard's fault (a store's package missing): the user's to fix
            raise
        except Exception as exn:  # noqa: BLE001 (any failure to read a shard is counted, never fatal)
            errors.append(exn)
        if last is not None and not errors:  # the sample being read when the shard broke off is incomplete
            yield last
        if errors:
            first = next((e for e in errors if isinstance(e, ShardUnreadable)), errors[0])
            if isinstance(first, ShardUnreadable):
                counter.add(first.reason, where=url, detail=first.detail, unit="shard")
            else:
                detail = f"{type(first).__name__}: {first.args[0] if first.args else first}"
                counter.add("unreadable_tar", where=url, detail=detail, unit="shard")


def read_sample_at(
    url: str, offset: int, key: str, select: Callable[[str], bool] = wanted_member, options: FetchOptions | None = None
) -> dict[str, Any]:
    """The raw sample `key` whose first tar header is at byte `offset` of shard `url` (see `read_samples`).

    Raises:
        UserError: no sample `key` starts there (the shard changed since the offset was recorded).
    """
    with open_at(url, offset, options) as stream:
        for sample in _samples(stream, url, offset, select, []):
            if sample["__key__"] == key:
                return sample
            break
    raise UserError(f"{url}: no sample '{key}' at byte {offset}; the shard changed since the checkpoint was written")


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does


def _samples(
    stream: IO[bytes], url: str, base: int, select: Callable[[str], bool], errors: list[Exception]
) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream that starts at byte `base` of its shard, grouped by key as webdataset does.

    Members `select` refuses are kept as empty placeholders, never their bytes: dropping them whole would
    make a sample made only of such members vanish uncounted; with the placeholder it reaches the decoder
    and is counted (`no_image`). A duplicate member name is recorded in `errors` and its second copy dropped.
    """
    from webdataset.tariterators import base_plus_ext

    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo)  # noqa: SIM115 (the caller closes it)
    seekable = getattr(tar.fileobj, "comptype", "tar") == "tar"
    current: dict[str, Any] | None = None
    for info in tar:
        name = info.name
        if not info.isreg() or _META.match(name):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        data = tar.extractfile(info).read() if select(name) else b""  # type: ignore[union-attr]
        tar.members = []  # a stream of millions of members: keep none
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url, "__offset__": base + info.offset if seekable else -1}
        if suffix in current:
            errors.append(ValueError(f"{name}: duplicate file name in tar file"))
            continue
        current[suffix] = data
    problem = _check_end(tar, base)
    if problem is not None:  # recorded before the last sample is yielded: the caller then drops it
        errors.append(problem)
    if current is not None:
        yield current


class _CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo that records on its TarFile why the member headers ended (`ended_by`).

    In stream mode tarfile stops without a word at any header it cannot parse past the first one: a damaged
    header (bad checksum), a header cut short, or the end of the data where a header should be. Only a zero
    block is a real end of archive; `_check_end` tells them apart with what is recorded here.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.ended_by = e  # type: ignore[attr-defined]
            raise


def _check_end(tar: tarfile.TarFile, base: int) -> Exception | None:
    """The problem when the member headers of `tar` (a stream from byte `base`) did not end at an end of archive.

    A complete tar ends in two zero blocks: a damaged header, a stream cut at or inside a header, or a
    missing second zero block (cut right after the first) mean members were lost after the last one read.
    """
    ended_by = getattr(tar, "ended_by", None)
    at = base + tar.offset
    if isinstance(ended_by, tarfile.EOFHeaderError):
        if tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE:  # type: ignore[union-attr]
            return None
        return OSError(f"truncated: one end-of-archive block at byte {at}, not two")
    if isinstance(ended_by, tarfile.EmptyHeaderError):
        return OSError(f"truncated: the data ends at byte {at}, where a member header or the end blocks should be")
    if isinstance(ended_by, tarfile.TruncatedHeaderError):
        return OSError(f"truncated: the data ends inside the member header at byte {at}")
    return OSError(f"damaged member header at byte {at} ({ended_by}); the members after it are lost")


def file_sample(path: str | Path) -> dict[str, Any]:
    """The raw sample of a loose image file: its bytes under its extension, plus the sidecar `.txt` if any."""
    path = Path(path)
    sample: dict[str, Any] = {
        "__key__": path.stem,
        "__url__": str(path),
        path.suffix.lower().lstrip("."): path.read_bytes(),
    }
    sidecar = path.with_suffix(".txt")  # img2dataset-style folders keep captions beside the images
    if sidecar.is_file():
        sample["txt"] = sidecar.read_bytes()
    return sample


def open_at(url: str, offset: int = 0, options: FetchOptions | None = None) -> IO[bytes]:
    """A binary stream of shard `url` from byte `offset`.

    Local files are opened and seeked; http(s) URLs read through `HttpStream`; fsspec stores (s3://, gs://,
    hf://, memory://, ...) through `mmcl.data.store`, with range reads from `offset`; `pipe:` and ais:// through
    `webdataset.gopen`, the first `offset` bytes discarded.

    Raises:
        ShardUnreadable: a remote shard that could not be opened after the retries.
        UserError: a store whose fsspec package is not installed.
        OSError: a local file that cannot be opened.
    """
    if url.startswith(HTTP_PREFIXES):
        return io.BufferedReader(HttpStream(url, offset, options), buffer_size=1 << 16)
    if is_store(url):
        return io.BufferedReader(open_store(url, offset, options), buffer_size=1 << 20)
    if not is_remote(url):
        f = open(os.path.expanduser(url.removeprefix("file:")), "rb")  # noqa: SIM115 (the caller closes it)
        if offset:
            f.seek(offset)
        return f
    from webdataset import gopen

    stream = gopen.gopen(url)
    todo = offset
    while todo:
        chunk = stream.read(min(todo, 1 << 20))
        if not chunk:
            raise OSError(f"{url}: ended before byte {offset}")
        todo -= len(chunk)
    return stream
