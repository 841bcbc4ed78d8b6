"""Data loader throughput: mmcl's training pipeline against open_clip's webdataset pipeline, same shards.

    python -m bench.bench_loader              # full run (~10 min); writes bench/results/loader.json + loader.md
    python -m bench.bench_loader --tiny       # a quick check of the script (results go to a temp folder)

Both pipelines do the same work per sample: read the tar, decode the JPEG, a random-resized crop to the
model's size, normalise, tokenize the caption (CLIP BPE, context 32), batch 128. Each uses its own code:

* open_clip: `open_clip_train.data.get_wds_dataset` (shard shuffle, 5000-sample shuffle buffer,
  `wds.decode("pilrgb")`, `open_clip.image_transform(size, is_train=True)` = PIL RandomResizedCrop
  (scale 0.9-1) + ToTensor + Normalize, the open_clip tokenizer), in a `wds.WebLoader`;
* mmcl: `mmcl.data.pipeline.build_stream(DataConfig, model, shards, train=True)` + `make_loader`
  (1000-sample shuffle buffer, PIL decode with JPEG draft mode when the stored image is >= 2x the
  target, `mmcl.data.transforms.ImageTransform`: a random-resized crop (scale 0.8-1) drawn from a
  per-sample Python RNG, resized by torch on uint8, normalised per batch in the collator; the model's
  tokenizer).

Configurations are (model image size, stored shard image size): 64 px from 64 px shards (what a tiny
model trains on), 224 px from 256 px shards, and 64 px from the same 256 px shards (large stored images,
small model: mmcl's draft decoding applies). For each configuration and loader worker count the two
pipelines run alternately in this process (order swapped every repeat): a fresh loader, warm-up batches
(`--warmup-batches` per worker, which also absorbs worker start-up and shuffle-buffer filling), then
batches are timed for at least `--min-seconds`. The table gives the median images/s over `--repeats`.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    RESULTS,
    brace_pattern,
    machine_info,
    median,
    patch_open_clip,
    reproduce_command,
    synthetic_shards,
    wait_for_quiet,
    write_results,
)

OPENCLIP_MODEL = "open_clip-tiny-64"  # tokenizer: CLIP BPE, context 32
MMCL_PRESET = "clip-tiny-64"  # the same architecture and tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["64:64", "224:256", "64:256"], help="IMAGE_SIZE:SHARD_PX")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=5.0, help="timed span per measurement")
    p.add_argument("--warmup-batches", type=int, default=2, help="per loader worker (at least this many)")
    p.add_argument("--samples", type=int, default=20000, help="samples per shard set (64 px)")
    p.add_argument("--samples-large", type=int, default=10000, help="samples per shard set (>= 128 px)")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--tiny", action="store_true", help="seconds-long check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats, args.min_seconds, args.batch_size = 1, 0.3, 32
        args.samples, args.samples_large, args.no_wait = 1200, 600, True
        args.configs = args.configs[:2]
        args.data_dir = args.data_dir / "tiny"
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_loader_")) if args.tiny else RESULTS
    return args


def shard_dir(args: argparse.Namespace, shard_px: int) -> Path:
    n = args.samples if shard_px <= 64 else args.samples_large
    maxcount = max(n // 20, 1)  # 20 shards: enough for 2 workers in both pipelines
    out = args.data_dir / f"synthetic_train_{shard_px}px_{n}"  # bench_train.py reads the 64 px set too
    return synthetic_shards(out, n, image_size=shard_px, maxcount=maxcount)


# ----------------------------------------------------------------------------- the two pipelines


def openclip_loader(shards: Path, image_size: int, workers: int, batch_size: int):
    """open_clip's own training loader (`get_wds_dataset`), built from the namespace its trainer passes."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=brace_pattern(shards),
        val_data=None,
        dataset_resampled=False,
        train_num_samples=None,  # read from sizes.json
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch_size,
        workers=workers,
        world_size=1,
    )
    preprocess = open_clip.image_transform(
        image_size, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    tokenizer = open_clip.get_tokenizer(OPENCLIP_MODEL)
    return get_wds_dataset(args, preprocess, is_train=True, epoch=0, floor=False, tokenizer=tokenizer).dataloader


_MMCL_MODELS: dict[int, Any] = {}


def mmcl_loader(shards: Path, image_size: int, workers: int, batch_size: int):
    """mmcl's training loader, as the trainer builds it."""
    from mmcl.config import DataConfig, model_config
    from mmcl.data.pipeline import build_stream
    from mmcl.data.shards import make_loader
    from mmcl.models import build_model

    if image_size not in _MMCL_MODELS:  # only preprocess_cfg() and the tokenizer are used
        cfg = model_config({"preset": MMCL_PRESET, "image": {"image_size": image_size}})
        _MMCL_MODELS[image_size] = build_model(cfg)
    stream = build_stream(DataConfig(batch_size=batch_size), _MMCL_MODELS[image_size], [str(shards)], train=True)
    return make_loader(stream, workers)


def _n_images(batch: Any) -> int:
    return batch[0].shape[0] if isinstance(batch, (tuple, list)) else batch.images.shape[0]


def _cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds so far of this process and each of its descendants (the loader workers)."""
    import psutil

    me = psutil.Process()
    times = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        times[p.pid] = t.user + t.system
    return times


def measure(loader, workers: int, args: argparse.Namespace, max_images: int) -> dict[str, float]:
    """Images/s over the timed span after the warm-up, the CPU time per image spent by the main process and
    the workers in that span (less sensitive to other jobs on the machine than images/s), and the time to
    the first batch."""
    t_start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_batch_s = time.perf_counter() - t_start
    shape = tuple(first[0].shape if isinstance(first, (tuple, list)) else first.images.shape)
    for _ in range(max(args.warmup_batches * max(workers, 1), 1) - 1):
        next(it)
    images, batches, exhausted = 0, 0, False
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    while True:
        batch = next(it, None)
        if batch is None:
            exhausted = True
            break
        images += _n_images(batch)
        batches += 1
        elapsed = time.perf_counter() - t0
        if (elapsed >= args.min_seconds and batches >= 2) or images >= max_images:
            break
    elapsed = time.perf_counter() - t0
    cpu1 = _cpu_seconds()
    cpu = sum(cpu1[pid] - cpu0[pid] for pid in cpu1 if pid in cpu0)
    del it
    return {
        "images_per_s": images / elapsed if elapsed > 0 else float("nan"),
        "images": images,
        "seconds": elapsed,
        "cpu_ms_per_image": 1000 * cpu / images if images else float("nan"),
        "first_batch_s": first_batch_s,
        "exhausted": exhausted,
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "batch_shape": shape,
    }


BUILDERS = {"open_clip": openclip_loader, "mmcl": mmcl_loader}


def run(args: argparse.Namespace) -> dict[str, Any]:
    patch_open_clip()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    dirs = {px: shard_dir(args, px) for px in sorted({px for _, px in configs})}
    load = {"quiet": True, "threshold": None, "waited_s": 0, "load_history": [os.getloadavg()[0]]}
    if not args.no_wait:
        load = wait_for_quiet()
    info = machine_info()
    raw: list[dict[str, Any]] = []
    started = time.time()
    for repeat in range(args.repeats):
        for i, (size, px) in enumerate(configs):
            n_samples = args.samples if px <= 64 else args.samples_large
            for workers in args.workers:
                order = ["open_clip", "mmcl"] if (repeat + i + workers) % 2 == 0 else ["mmcl", "open_clip"]
                for name in order:
                    loader = BUILDERS[name](dirs[px], size, workers, args.batch_size)
                    m = measure(loader, workers, args, max_images=int(0.6 * n_samples))
                    del loader
                    gc.collect()
                    row = {"pipeline": name, "image_size": size, "shard_px": px, "workers": workers, "repeat": repeat}
                    raw.append({**row, **m})
                    print(
                        f"[loader] r{repeat} {name:9s} {size:3d}px from {px}px, {workers} workers: "
                        f"{m['images_per_s']:7.1f} img/s, {m['cpu_ms_per_image']:.2f} CPU ms/img "
                        f"(first batch {m['first_batch_s']:.2f}s)",
                        flush=True,
                    )
    load["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    summary = []
    for size, px in configs:
        for workers in args.workers:
            cell = {"image_size": size, "shard_px": px, "workers": workers}
            for name in BUILDERS:
                runs = [
                    r
                    for r in raw
                    if r["pipeline"] == name and (r["image_size"], r["shard_px"], r["workers"]) == (size, px, workers)
                ]
                cell[f"{name}_images_per_s"] = round(median([r["images_per_s"] for r in runs]), 1)
                cell[f"{name}_first_batch_s"] = round(median([r["first_batch_s"] for r in runs]), 2)
                cell[f"{name}_cpu_ms_per_image"] = round(
                    median([r.get("cpu_ms_per_image", float("nan")) for r in runs]), 2
                )
                cell[f"{name}_all"] = [round(r["images_per_s"], 1) for r in runs]
            cell["ratio_mmcl_over_open_clip"] = round(cell["mmcl_images_per_s"] / cell["open_clip_images_per_s"], 2)
            summary.append(cell)
    return {
        "benchmark": "loader",
        "command": reproduce_command("bench_loader.py"),
        "settings": {
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "min_seconds": args.min_seconds,
            "warmup_batches_per_worker": args.warmup_batches,
            "samples": {px: (args.samples if px <= 64 else args.samples_large) for px in dirs},
            "shards": {px: str(d) for px, d in dirs.items()},
            "tiny": args.tiny,
        },
        "machine": info,
        "load": load,
        "duration_s": round(time.time() - started),
        "summary": summary,
        "runs": raw,
    }


def write(res: dict[str, Any], out: Path | None) -> tuple[Path, Path]:
    """bench/results/loader.{json,md} (or `out`) through the one results writer."""
    s = res["settings"]
    samples = ", ".join(f"{n} samples at {px} px" for px, n in s["samples"].items())
    rows = [
        [
            c["image_size"],
            c["shard_px"],
            c["workers"],
            f"{c['open_clip_images_per_s']:.0f}",
            f"{c['mmcl_images_per_s']:.0f}",
            f"{c['ratio_mmcl_over_open_clip']:.2f}x",
            f"{c.get('open_clip_cpu_ms_per_image', float('nan')):.2f} / {c.get('mmcl_cpu_ms_per_image', float('nan')):.2f}",
            f"{c['open_clip_first_batch_s']:.2f} / {c['mmcl_first_batch_s']:.2f}",
        ]
        for c in res["summary"]
    ]
    columns = ["image px", "shard px", "workers", "open_clip img/s", "mmcl img/s", "mmcl / open_clip",
               "CPU ms/img (oc / mmcl)", "first batch s (oc / mmcl)"]  # fmt: skip
    intro = f"""Images/s after tar read + JPEG decode + random-resized crop + normalise + tokenize (CLIP BPE, context 32)
+ batch {s["batch_size"]}, median of {s["repeats"]} repeats; the two pipelines alternate in one process.
open_clip: `open_clip_train.data.get_wds_dataset` with `open_clip.image_transform(is_train=True)`;
mmcl: `mmcl.data.pipeline.build_stream` + `mmcl.data.shards.make_loader`. Built-in synthetic shards
(JPEG q95, 20 shards per set): {samples}. Timed span >= {s["min_seconds"]} s
after {s["warmup_batches_per_worker"]} warm-up batches per worker; "first batch" is the start-up latency
(worker start + shuffle-buffer fill + first batch). Workers = DataLoader worker processes
(0 = in the main process). "CPU ms/img" = user + system CPU time of the main process and its workers over
the timed span per image: what the loader costs the machine, and less sensitive than images/s to other
jobs sharing the CPUs (on 2 cores, every loader CPU-ms is taken from the training step)."""
    return write_results("loader", rows, columns, "Loader throughput: mmcl vs open_clip (same shards)",
                         "Per-repeat values are in `loader.json` (`summary[*].*_all`, `runs`).", res["machine"],
                         intro=intro, data=res, load=res["load"],
                         during=[r.get("loadavg_1min_after") for r in res["runs"]], command=res["command"],
                         out_dir=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write(run(args), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
