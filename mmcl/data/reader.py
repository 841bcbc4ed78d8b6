"""Listing and reading shards: the one place that turns shard specs into raw samples.

Training (`mmcl.data.shards`), evaluation (`mmcl.eval.datasets`), the retrieval index (`mmcl.index`) and the
tokenizer trainer (`mmcl.data.tokenizer_train`) all list their inputs and read tars here:

* listing: `expand_shards` (one pattern: a folder of tars, a glob, a brace pattern, a URL, `builtin:NAME`),
  `list_shards` (several specs in order, plus CLIP_benchmark's `ROOT/<split>/nshards.txt` layout) and
  `list_inputs` (shards and loose image files, for the index);
* reading: `read_samples` streams raw samples (`{'__key__', '__url__', ext: bytes}`) with webdataset's tar
  readers, only ever reading the members `wanted_member` allows (images, `.txt`, `.json`, `.cls`: webdataset's
  default decoders would unpickle `.pyd` and `torch.load` `.pth`). An unreadable shard (0 bytes, not a tar,
  truncated) is counted once as `unreadable_tar` and skipped, never raised;
* `file_sample` makes the same raw sample from a loose image file and its sidecar `.txt`.

Decoding a raw sample (image, caption, label) is `mmcl.data.decode`'s job.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand

from mmcl.data.decode import IMAGE_EXTS, SkipCounter
from mmcl.utils import UserError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://")
WANTED_SUFFIXES = {*IMAGE_EXTS, "txt", "json", "cls"}  # never pkl/pth/npy/pyd


def wanted_member(name: str) -> bool:
    """Whether to read a tar member: images, captions, json, labels; never pickles, torch or numpy files."""
    return name.rsplit(".", 1)[-1].lower() in WANTED_SUFFIXES


def is_remote(url: str) -> bool:
    """Whether `url` is read through webdataset's openers (pipe:, http(s), s3, ...) rather than from disk."""
    return url.startswith(REMOTE_PREFIXES)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS and path.is_file()


# ----------------------------------------------------------------------------- listing


def expand_shards(pattern: str) -> list[str]:
    """A directory (all its .tar), a glob, a brace pattern or `builtin:NAME` -> sorted shard list.

    A pattern that matches nothing is a clear error naming it.
    """
    from mmcl.data.builtin import builtin_dir, is_builtin

    if is_builtin(pattern):
        pattern = str(builtin_dir(pattern))
    if is_remote(pattern):
        return list(braceexpand.braceexpand(pattern))
    path = Path(pattern)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    else:
        found = []
        for expanded in braceexpand.braceexpand(pattern):
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
    urls: Iterable[str], counter: SkipCounter, select: Callable[[str], bool] = wanted_member
) -> Iterator[dict[str, Any]]:
    """Raw samples `{'__key__', '__url__', ext: bytes, ...}` of the shards `urls`, in order, streaming.

    Args:
        urls: shard paths or URLs (any iterable, e.g. an endless resampled stream).
        counter: receives one `unreadable_tar` per shard that cannot be opened or read to its end
            (0 bytes, not a tar, truncated); the complete samples read before the damage are kept, the one
            being read when it broke off is dropped.
        select: which members to read (by file name); must never admit pickles (see `wanted_member`).
    """
    from webdataset import tariterators

    for url in urls:  # one shard at a time, so damage is counted once per shard however often tarfile trips on it
        errors: list[Exception] = [] if is_remote(url) else _missing_end(url)

        def handler(exn: Exception, errors: list[Exception] = errors) -> bool:
            errors.append(exn)
            return True  # keep what can still be read

        opened = tariterators.url_opener([{"url": url}], handler=handler)
        files = (_placeholder(f, select) for f in tariterators.tar_file_expander(opened, handler=handler))
        last = None
        for sample in tariterators.group_by_keys(files, handler=handler):
            if last is not None:
                yield last
            last = sample
        if last is not None and not errors:  # the sample being read when the shard broke off is incomplete
            yield last
        if errors:
            counter.add("unreadable_tar", where=url, detail=f"{type(errors[0]).__name__}: {errors[0].args[0]}")


def _placeholder(member: dict[str, Any], select: Callable[[str], bool]) -> dict[str, Any]:
    """A member mmcl does not read (.pkl, .pth, ...) kept as an empty placeholder, never its bytes.

    Dropping it whole would make a sample made only of such members vanish uncounted; with the
    placeholder it reaches the decoder and is counted (`no_image`).
    """
    if "fname" in member and not select(member["fname"]):
        return {**member, "data": b""}
    return member


def _missing_end(path: str) -> list[Exception]:
    """[the problem] when a local tar cannot be complete, else [].

    Python's tarfile ends a stream silently where a header is cut short, so a shard truncated at or inside a
    member header reads as a shorter valid one. A complete tar is a whole number of 512-byte blocks ending
    in (at least) two zero blocks; check that instead (two small reads).
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return []  # tarfile itself reports an empty file
        if size % 512:
            return [OSError(f"truncated: {size} bytes is not a whole number of 512-byte tar blocks")]
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            if f.read().strip(b"\0"):
                return [OSError("truncated: no end-of-archive blocks")]
    except OSError as e:
        return [e]
    return []


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
