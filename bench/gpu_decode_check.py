"""data.decode_on=device on a CUDA GPU: the nvJPEG path against the worker path, same shards, same crops.

    python -m bench.gpu_decode_check OUT_DIR              # writes OUT_DIR/gpu_decode.json
    python -m bench.gpu_decode_check OUT_DIR --n 512      # quicker
    python -m bench.gpu_decode_check OUT_DIR --n 256 --device cpu --workers 1   # a dry run of the script on CPU

Checks, at 224 px from 256 px shards (and 64 px from the same shards, where the workers decode at reduced
scale): the two paths yield the same samples, and their images differ by at most a few pixel levels (nvJPEG's
IDCT and chroma upsampling are not libjpeg-turbo's; the CUDA resize runs in float). Then images/s of the
batched device decode alone, and of each whole loader (workers + device decode) at `--workers`.
Without CUDA it exits with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import synthetic_shards

MEAN_BOUND, P99_BOUND = 2.0, 8.0  # pixel levels, as tests/data/test_device_decode.py bounds the reduced-scale case


class _Model:
    """What the data pipeline asks of a model (no captions are tokenized: images only)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def preprocess_cfg(self) -> dict[str, Any]:
        from mmcl.data.transforms import OPENAI_MEAN, OPENAI_STD

        return {"image_size": self.size, "mean": OPENAI_MEAN, "std": OPENAI_STD}


def _stream(shards: Path, size: int, decode_on: str, batch_size: int):
    from mmcl.config import DataConfig
    from mmcl.data.pipeline import build_stream

    cfg = DataConfig(train_shards=[str(shards)], batch_size=batch_size, shuffle_buffer=64, decode_on=decode_on)
    return cfg, build_stream(cfg, _Model(size), cfg.train_shards, train=True, seed=0, need_caption=False)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(shards: Path, size: int, batch_size: int, device: str) -> dict[str, Any]:
    """Worker path (CPU) vs device path, no loader processes so both read the samples in the same order."""
    import torch

    from mmcl.data.pipeline import device_decoder
    from mmcl.data.shards import make_loader

    _, ws = _stream(shards, size, "workers", batch_size)
    cfg, ds = _stream(shards, size, "device", batch_size)
    decode = device_decoder(cfg, _Model(size), device)
    std = torch.tensor(_Model(size).preprocess_cfg()["std"]).view(1, 3, 1, 1) * 255
    diffs, same_keys, dropped = [], True, 0
    for w, d in zip(make_loader(ws, 0), make_loader(ds, 0)):
        d, skipped = decode(d)
        dropped += sum(skipped.values())
        same_keys &= w.keys == d.keys
        if w.keys == d.keys:
            diffs.append(((d.images.cpu() - w.images) * std).abs().flatten())
    diff = torch.cat(diffs)
    stats = {
        "image_size": size,
        "same_samples": bool(same_keys),
        "dropped_on_device": dropped,
        "mean_levels": float(diff.mean()),
        "p99_levels": float(diff.float().kthvalue(max(1, int(0.99 * diff.numel()))).values),
        "max_levels": float(diff.max()),
    }
    stats["ok"] = same_keys and stats["mean_levels"] <= MEAN_BOUND and stats["p99_levels"] <= P99_BOUND
    return stats


def throughput(
    shards: Path, size: int, batch_size: int, workers: int, max_images: int, device: str
) -> dict[str, float]:
    """Images/s: the batched CUDA decode alone (batches prepared beforehand), and each loader end to end."""

    from mmcl.data.pipeline import device_decoder
    from mmcl.data.shards import make_loader

    cfg, ds = _stream(shards, size, "device", batch_size)
    decode = device_decoder(cfg, _Model(size), device)
    encoded = [b for _, b in zip(range(max(1, max_images // batch_size)), make_loader(ds, workers))]
    decode(encoded[0])  # nvJPEG and kernel start-up
    _sync(device)
    t = time.perf_counter()
    n = 0
    for b in encoded:
        n += len(decode(b)[0].keys)
    _sync(device)
    out = {"device_decode_only": n / (time.perf_counter() - t)}
    for decode_on in ("workers", "device"):
        cfg, stream = _stream(shards, size, decode_on, batch_size)
        finish = device_decoder(cfg, _Model(size), device) if decode_on == "device" else None
        n, t = 0, None
        for i, b in enumerate(make_loader(stream, workers)):
            if finish is not None:
                b = finish(b)[0]
            else:
                b.images = b.images.to(device, non_blocking=True)
            if i == max(workers, 1) - 1:  # each worker has made its first batch: start the clock
                _sync(device)
                t, n = time.perf_counter(), 0
            elif t is not None:
                n += len(b.keys)
            if n >= max_images:
                break
        _sync(device)
        out[f"loader_{decode_on}"] = n / (time.perf_counter() - t) if t else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=2048, help="samples in the 256 px shards")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda", help="cuda (the check); cpu only tries the script out")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_decode_check: no CUDA device here; run it on a machine with a GPU")
    from mmcl.utils import atomic_write_text

    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp) / "s256", args.n, image_size=256, maxcount=256, num_workers=2)
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "torch": torch.__version__,
            "command": " ".join([sys.executable, *sys.argv]),
            "parity": [compare(shards, size, args.batch_size, args.device) for size in (224, 64)],
            "images_per_s_224": throughput(shards, 224, args.batch_size, args.workers, args.n, args.device),
            "workers": args.workers,
        }
    result["ok"] = all(r["ok"] for r in result["parity"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "gpu_decode.json", json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
