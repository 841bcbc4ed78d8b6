"""Write image-text samples as WebDataset shards in img2dataset's layout.

    out/00000.tar         000000000.jpg .txt .json [.cf.jpg .cf.txt .cf.json], 000000001.jpg ...  (key f"{shard:05d}{index:04d}")
    out/00000_stats.json  img2dataset stats: count, successes, failed_to_*, status_dict, times
    out/sizes.json        {"00000.tar": samples, ...}: sample counts without reading tars
    out/classnames.txt    one class per line, when the source is labelled

A shard holds at most `maxcount` inputs (its key index counts failed inputs too,
as in img2dataset) and, with `maxsize`, at most that many bytes. Images are decoded,
resized and encoded in `num_workers` processes; `Pool.imap` keeps input order, so
the output is byte-identical for any worker count. Each shard is written to a temp
file and renamed, then its stats; a shard counts as finished when both exist, and a
re-run keeps finished shards without re-encoding their inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmcl.data.sources import InputError, RawSample, RealSource, SyntheticSource
from mmcl.utils import UserError, atomic_open, atomic_write_text, disk_errors, lock_folder, log, progress_bar

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESIZE_MODES = ("shorter", "longer", "center_crop")
_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads members to blocks and the archive to records
_MAX_WARNINGS, _MAX_LISTED = 50, 10_000
_SHARD = re.compile(r"^(\d{5})\.tar$")
_STATS = re.compile(r"^\d{5}_stats\.json$")
_STRAY_TMP = re.compile(r"^\.(\d{5}\.tar|\d{5}_stats\.json|sizes\.json|classnames\.txt)\..*\.tmp$")


@dataclass
class WriteSummary:
    """What `write_shards` did.

    Attributes:
        shards: all shard files of the dataset, in order; `samples` / `inputs` count them all.
        failed: inputs of this run that could not be written; `failures` lists (source, reason)
            for the first 10,000 of them.
        written_shards / kept_shards: shards written now / finished by an earlier run and kept.
    """

    out_dir: Path
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    inputs: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # this run's failed inputs by reason
    written_shards: list[str] = field(default_factory=list)
    kept_shards: list[str] = field(default_factory=list)
    duration: float = 0.0


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if size <= 0:
        return image
    w, h = image.size
    scale = size / (max(w, h) if mode == "longer" else min(w, h))
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop" and image.size != (size, size):
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


_OPTIONS: dict[str, Any] = {}


def _init_worker(options: dict[str, Any]) -> None:
    _OPTIONS.update(options)


def _encode(task: tuple[int, RawSample]) -> tuple[int, str, dict[str, Any] | InputError]:
    """(input index, sample) -> (input index, source, encoded members + json fields, or the failure)."""
    index, sample = task
    source = sample.source
    try:
        try:
            sample = sample.resolve()
        except InputError:  # a loader that knows why its input failed (e.g. a dangling symlink)
            raise
        except Exception as e:  # a generator or loader bug: count it like an unreadable input
            raise InputError("failed_to_download", "cannot load sample", f"{type(e).__name__}: {e}") from e
        original, image, data = _encoded_image(sample)
        # a counterfactual that cannot be encoded fails its input: it was asked for, so the sample is incomplete
        c = sample.counterfactual
        cf = {"image": _encoded_image(c)[2], "caption": c.caption, "json": c.meta} if c is not None else None
    except InputError as f:
        return index, source, f
    fields = {
        "status": "success",
        "error_message": None,
        "caption": sample.caption,
        "url": sample.source,
        "width": image.width,
        "height": image.height,
        "original_width": original[0],
        "original_height": original[1],
        "exif": None,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    for k, v in sample.meta.items():
        fields.setdefault(k, v)
    return index, source, {"image": data, "caption": sample.caption, "json": fields, **({"cf": cf} if cf else {})}


def _encoded_image(sample: RawSample) -> tuple[tuple[int, int], Image.Image, bytes]:
    """(original size, resized image, its encoded bytes) of a resolved sample; raises InputError."""
    image = sample.load_image(_OPTIONS["max_pixels"])
    original = image.size
    image = _resize(image, _OPTIONS["image_size"], _OPTIONS["resize_mode"])
    buf, fmt = io.BytesIO(), _OPTIONS["image_format"]
    kwargs = {"quality": _OPTIONS["quality"]} if fmt in ("jpg", "webp") else {}
    try:
        image.save(buf, FORMATS[fmt], **kwargs)
    except Exception as e:
        raise InputError("failed_to_resize", "cannot encode image", f"{type(e).__name__}: {e}") from e
    return original, image, buf.getvalue()


class _ShardWriter:
    """One shard being written: a TarWriter on a temp file that becomes NNNNN.tar on `close()`."""

    def __init__(self, out: Path, shard: int, first_input: int, options: dict[str, Any]):
        import webdataset as wds  # imports torch: only in the process that writes

        self.out, self.shard, self.first_input, self.options = out, shard, first_input, options
        self.name = f"{shard:05d}.tar"
        self._ctx = atomic_open(out / self.name, "wb")
        self._file = self._ctx.__enter__()
        # Fixed mtime/owner: the same inputs give byte-identical tars.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="mmcl", group="mmcl")
        self.inputs, self.samples = 0, 0
        self.status: Counter[str] = Counter()
        self.failed = {"failed_to_download": 0, "failed_to_resize": 0}
        self.start = time.time()

    def _members(self, item: dict[str, Any]) -> dict[str, Any]:
        key = f"{self.shard:05d}{self.inputs:0{self.options['key_digits']}d}"
        fields = json.dumps({"key": key, **item["json"]}, default=str).encode()
        fmt, cf = self.options["image_format"], item.get("cf")
        members = {"__key__": key, fmt: item["image"], "txt": item["caption"].encode(), "json": fields}
        if cf is not None:  # KEY.cf.<fmt> / KEY.cf.txt / KEY.cf.json: the sample's counterfactual
            members |= {f"cf.{fmt}": cf["image"], "cf.txt": cf["caption"].encode(), "cf.json": json.dumps(cf["json"]).encode()}  # fmt: skip
        return members

    def size_with(self, item: dict[str, Any]) -> int:
        """The tar's size if `item` were its last sample (end-of-archive blocks and record padding included)."""
        members = sum(
            _TAR_BLOCK + math.ceil(len(v) / _TAR_BLOCK) * _TAR_BLOCK
            for k, v in self._members(item).items()
            if k != "__key__"
        )
        # tarstream.offset: bytes written so far (the file position lags behind the stream's buffer)
        return math.ceil((self._tar.tarstream.offset + members + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD

    def add(self, item: dict[str, Any] | InputError) -> None:
        if isinstance(item, InputError):
            self.failed[item.status] += 1
            self.status[item.reason] += 1
        else:
            self._tar.write(self._members(item))
            self.samples += 1
            self.status["success"] += 1
        self.inputs += 1  # failed inputs use up their key too, as in img2dataset

    def close(self) -> dict[str, Any]:
        self._tar.close()
        self._ctx.__exit__(None, None, None)
        end = time.time()
        stats = {
            "count": self.inputs,
            "successes": self.samples,
            "failed_to_download": self.failed["failed_to_download"],
            "failed_to_resize": self.failed["failed_to_resize"],
            "duration": round(end - self.start, 3),
            "start_time": self.start,
            "end_time": end,
            "status_dict": dict(self.status),
            "tar_bytes": (self.out / self.name).stat().st_size,
            "first_input": self.first_input,
            "mmcl_options": self.options,
        }
        atomic_write_text(self.out / f"{self.shard:05d}_stats.json", json.dumps(stats, indent=2))
        return stats

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file


def _finished_shards(out: Path, options: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards whose tar and stats exist and agree: {shard id: stats}. Other options -> UserError."""
    found = {}
    for tar in out.iterdir():
        m = _SHARD.match(tar.name)
        stats_path = out / f"{m.group(1)}_stats.json" if m else None
        if not m or not stats_path.is_file():
            continue
        try:
            stats = json.loads(stats_path.read_text())
        except ValueError:
            continue  # unreadable stats: rewrite the shard
        if stats.get("mmcl_options") != options:
            raise UserError(
                f"{out}: {tar.name} was written from another source or with other options; "
                "use a new folder or overwrite=True (--overwrite)"
            )
        if stats.get("tar_bytes") == tar.stat().st_size:
            found[int(m.group(1))] = stats
    return found


def _plan_resume(
    done: dict[int, dict[str, Any]], maxcount: int, maxsize: int, total: int | None
) -> tuple[dict[int, dict[str, Any]], Callable[[int], bool]]:
    """Which finished shards to keep, and a test for the input indices they cover."""
    if maxsize:  # shard boundaries depend on encoded sizes: keep only an unbroken prefix
        keep, prefix = {}, 0
        while len(keep) in done and done[len(keep)]["first_input"] == prefix:
            keep[len(keep)] = done[len(keep)]
            prefix += keep[len(keep) - 1]["count"]
        return keep, lambda i: i < prefix
    # Shard i holds inputs [i * maxcount, (i + 1) * maxcount). A short shard is kept only as the
    # known last one: a source that grew since would otherwise lose the inputs that now belong there.
    keep = {
        i: s
        for i, s in done.items()
        if s["first_input"] == i * maxcount and (s["count"] == maxcount or s["first_input"] + s["count"] == total)
    }
    return keep, lambda i: i // maxcount in keep


def _bounded(items: Iterable[Any], gate: threading.Semaphore, stop: threading.Event) -> Iterator[Any]:
    # Pool.imap's feeder thread drains its input eagerly; the gate caps samples in flight.
    # `stop` frees the feeder when the writer gives up (Pool.terminate joins that thread).
    for item in items:
        while not gate.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


def _terminate(pool: Any, timeout_s: float = 10.0) -> None:
    """Stop a busy pool without hanging: `Pool.terminate` joins its feeder thread, which can be stuck writing
    a task to the pipe of workers it has just killed (a CPython race); that thread is a daemon, so after
    `timeout_s` the workers are killed and it is left behind."""
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        for proc in pool._pool:
            proc.kill()
        log.warning("the shard writer's worker pool did not stop in %.0f s; its workers were killed", timeout_s)
        return
    pool.join()


def _still_needed(written: dict[str, int], total: int | None, maxcount: int) -> int | None:
    """Bytes the rest of the job would take, at the average size of what was written so far."""
    if not written["inputs"]:
        return None
    per_input = written["bytes"] / written["inputs"]
    left = total - written["inputs"] if total is not None else maxcount  # unknown total: at least a shard
    return int(per_input * max(left, 1))


def write_shards(
    source: Iterable[RawSample],
    out_dir: str | Path,
    *,
    maxcount: int = 10000,
    maxsize: int = 0,
    image_format: str = "jpg",
    image_size: int = 0,
    resize_mode: str = "shorter",
    quality: int = 95,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    classnames: list[str] | None = None,
    max_pixels: int = 100_000_000,
) -> WriteSummary:
    """Encode `source` into img2dataset-style shards in `out_dir`, resuming a previous run.

    Args:
        source: RawSamples, e.g. a `mmcl.data.sources` source (its `describe()` guards resume).
        out_dir: output folder (created).
        maxcount: inputs per shard (failed ones included: keys stay stable).
        maxsize: bytes per shard, 0 = no limit (a single larger sample still gets a shard).
        image_format: "jpg", "png" or "webp".
        image_size: resize target in pixels, 0 = keep the size; see `resize_mode`.
        resize_mode: "shorter" / "longer" side to `image_size` keeping the aspect ratio, or
            "center_crop" to an `image_size` square.
        quality: JPEG/WebP quality.
        num_workers: encoding processes (0 = in this process); the output does not depend on it.
            They are started with "spawn" (safe beside torch's threads), so a script calling this
            needs the usual `if __name__ == "__main__":` guard.
        progress: show a tqdm bar (on a terminal; plain log lines every 30 s in a log file).
        overwrite: delete existing shards first instead of resuming.
        classnames: written to classnames.txt; default: `source.classnames` when it has them.
        max_pixels: images whose header declares more pixels fail without being decoded.

    Returns:
        A WriteSummary; inputs that could not be read or decoded are logged and listed there.
    """
    if maxcount < 1 or maxsize < 0 or image_size < 0 or not 1 <= quality <= 100 or num_workers < 0:
        raise UserError(
            "write_shards: need maxcount >= 1, maxsize >= 0, image_size >= 0, 1 <= quality <= 100, num_workers >= 0"
        )
    if image_format not in FORMATS:
        raise UserError(f"unknown image format '{image_format}' (choose from {', '.join(FORMATS)})")
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode '{resize_mode}' (choose from {', '.join(RESIZE_MODES)})")
    start = time.time()
    out = Path(out_dir)
    with disk_errors(out):  # e.g. a read-only output folder: one line
        out.mkdir(parents=True, exist_ok=True)
        # One writer per folder: a second one (two runs first using the same `builtin:` data) waits, then keeps
        # the finished shards. Holding the lock also makes every temp file found below a dead writer's.
        lock = lock_folder(out, None, "shard writer", wait=True)  # the folder itself: no file in the layout
    written = {"inputs": 0, "bytes": 0}  # for the space a full disk would have needed
    try:
        with disk_errors(
            out, needed=lambda: _still_needed(written, None if total is None else total - n_kept, maxcount)
        ):
            describe = getattr(source, "describe", None)
            options = {
                "maxcount": maxcount, "maxsize": maxsize, "image_format": image_format, "image_size": image_size,
                "resize_mode": resize_mode, "quality": quality, "max_pixels": max_pixels,
                "key_digits": max(4, len(str(maxcount - 1))), "source": describe() if describe else None,
            }  # fmt: skip
            options = json.loads(json.dumps(options))  # the form it takes in the stats file, for comparison
            for p in out.iterdir():
                if _STRAY_TMP.match(p.name) or (overwrite and (_SHARD.match(p.name) or _STATS.match(p.name))):
                    p.unlink()  # a dead writer's temp files (we hold the lock), or shards we were asked to replace
            total = len(source) if hasattr(source, "__len__") else None
            keep, skipped = _plan_resume(_finished_shards(out, options), maxcount, maxsize, total)

            summary = WriteSummary(out)
            all_stats: dict[int, dict[str, Any]] = dict(keep)
            summary.kept_shards = [f"{i:05d}.tar" for i in sorted(keep)]
            bar = progress_bar(total, f"shards -> {out}", "img", enabled=progress)  # plain lines in a log file
            n_kept = sum(s["count"] for s in keep.values())
            bar.update(n_kept)
            tasks = ((i, s) for i, s in enumerate(source) if not skipped(i))
            shard: _ShardWriter | None = None
            n_inputs = n_kept
            pool = None
            try:
                if num_workers > 0:
                    chunk = 16
                    gate, stop = threading.Semaphore(chunk * num_workers * 4), threading.Event()
                    pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (options,))
                    results: Iterator = pool.imap(_encode, _bounded(tasks, gate, stop), chunksize=chunk)
                else:
                    _init_worker(options)
                    gate, results = None, map(_encode, tasks)
                for index, src, item in results:
                    if gate is not None:
                        gate.release()
                    n_inputs += 1
                    if maxsize:
                        full = shard is not None and (
                            shard.inputs >= maxcount
                            or (not isinstance(item, InputError) and shard.samples and shard.size_with(item) > maxsize)
                        )
                        target = (shard.shard + 1 if full else shard.shard) if shard is not None else len(keep)
                    else:
                        target = index // maxcount
                    if shard is not None and shard.shard != target:
                        all_stats[shard.shard] = shard.close()
                        summary.written_shards.append(shard.name)
                        shard = None
                    if shard is None:
                        shard = _ShardWriter(out, target, index if maxsize else target * maxcount, options)
                    if isinstance(item, InputError):
                        summary.failed += 1
                        summary.failed_by_reason[item.reason] = summary.failed_by_reason.get(item.reason, 0) + 1
                        if len(summary.failures) < _MAX_LISTED:
                            summary.failures.append((src, item.detail))
                        if summary.failed <= _MAX_WARNINGS:
                            log.warning("skipped %s: %s", src, item.detail)
                        elif summary.failed == _MAX_WARNINGS + 1:
                            log.warning(
                                "more inputs failed; further failures are counted in the stats without a line each"
                            )
                    shard.add(item)
                    written["inputs"] += 1
                    written["bytes"] += 0 if isinstance(item, InputError) else 1536 + len(item["image"])  # + headers
                    bar.update(1)
                if shard is not None:
                    all_stats[shard.shard] = shard.close()
                    summary.written_shards.append(shard.name)
                    shard = None
                if pool is not None:
                    pool.close()  # all results are in: let the workers exit on their own
            finally:
                bar.close()
                if shard is not None:
                    shard.abort()
                if pool is not None:
                    stop.set()
                    _terminate(pool)  # no-op after close() + exit; stops busy workers on an error

            summary.shards = [f"{i:05d}.tar" for i in sorted(all_stats)]
            stale = [p.name for p in out.iterdir() if _SHARD.match(p.name) and p.name not in summary.shards]
            if stale:
                log.warning(
                    "%s: shards %s are not part of this run (another source?); sizes.json leaves them out",
                    out,
                    ", ".join(sorted(stale)),
                )
            summary.samples = sum(s["successes"] for s in all_stats.values())
            summary.inputs = n_inputs
            sizes = {f"{i:05d}.tar": all_stats[i]["successes"] for i in sorted(all_stats)}
            atomic_write_text(out / "sizes.json", json.dumps(sizes, indent=2))
            classnames = classnames if classnames is not None else getattr(source, "classnames", None)
            if classnames:
                atomic_write_text(out / "classnames.txt", "".join(c + "\n" for c in classnames))
            summary.duration = time.time() - start
            kept_failures = n_kept - sum(s["successes"] for s in keep.values())
            log.info(
                "%s: %d samples in %d shards (%d written, %d kept from an earlier run), %d inputs failed%s%s",
                out, summary.samples, len(summary.shards), len(summary.written_shards), len(summary.kept_shards),
                summary.failed, f" (+{kept_failures} in kept shards)" if kept_failures else "",
                f" ({', '.join(f'{r}: {n}' for r, n in sorted(summary.failed_by_reason.items()))})" if summary.failed else "",
            )  # fmt: skip
            return summary
    finally:
        lock.release()


def write_synthetic_shards(
    out_dir: str | Path, n: int, split: str = "train", seed: int = 0, image_size: int = 64, maxcount: int = 10000,
    counterfactuals: bool = False, **kwargs: Any,
) -> WriteSummary:  # fmt: skip
    """`n` built-in synthetic samples (see `mmcl.data.synthetic`; with `counterfactuals`, each with one edited
    scene) as shards; kwargs go to `write_shards`."""
    source = SyntheticSource(n, split, seed, image_size, counterfactuals=counterfactuals)
    return write_shards(source, out_dir, maxcount=maxcount, **kwargs)


def write_real_shards(
    out_dir: str | Path, name: str, split: str = "all", image_size: int = 32, **kwargs: Any
) -> WriteSummary:
    """The bundled "digits" or "photos" set (see `mmcl.data.real`) as shards; kwargs go to `write_shards`."""
    return write_shards(RealSource(name, split=split, image_size=image_size), out_dir, **kwargs)


def make_demo_data(
    root: str | Path,
    n_train: int = 20000,
    n_val: int = 1000,
    image_size: int = 32,
    seed: int = 0,
    maxcount: int = 1000,
    num_workers: int = 0,
    progress: bool = False,
) -> Path:
    """Synthetic `root/train` and `root/val` shards plus `root/classnames.txt`; returns `root`.

    The val split is a different random stream (`split="val"`), so no image is in both.
    Re-running with the same arguments keeps what is already written.
    """
    from mmcl.data.synthetic import CLASSNAMES

    root = Path(root)
    kw = {"seed": seed, "image_size": image_size, "maxcount": maxcount, "num_workers": num_workers, "progress": progress}  # fmt: skip
    write_synthetic_shards(root / "train", n_train, split="train", **kw)
    write_synthetic_shards(root / "val", n_val, split="val", **kw)
    atomic_write_text(root / "classnames.txt", "".join(c + "\n" for c in CLASSNAMES))
    return root
