"""data.decode_on=device: workers pass JPEG bytes + crop boxes, the batch is decoded on the device (here the CPU).

The device path must give the worker path's batch: same samples, same crops, same pixels up to the resize.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.config import ConfigError, DataConfig, load_experiment
from mmcl.data.device_decode import ENCODED_VIEW
from mmcl.data.pipeline import build_stream, device_decoder
from mmcl.data.shards import StreamState, make_loader
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # the fake model's image size: JPEGs with a side >= 32 are decoded at reduced scale by the workers


class FakeModel:
    def preprocess_cfg(self):
        return {"image_size": SIZE, "mean": (0.48, 0.45, 0.40), "std": (0.27, 0.26, 0.28)}

    def tokenizer(self, texts):
        ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
        return ids, torch.ones_like(ids)


def picture(seed: int, width: int, height: int) -> Image.Image:
    """A smooth image with some texture (what photos look like to a resize), not white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=int) + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    """`data` cut in its entropy-coded part: the header reads fine, only decoding finds the damage."""
    start = data.index(b"\xff\xda")  # start of scan
    return data[: start + (len(data) - start) // 2]


def write_shards(root: Path, images: list[tuple[str, bytes]], per_shard: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i, (ext, data) in enumerate(images[s : s + per_shard], start=s):
                for name, payload in ((f"{i:06d}.{ext}", data), (f"{i:06d}.txt", f"picture {i}\nphoto {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def batches(root: Path, decode_on: str, batch_size: int = 8, augment: bool = True):
    """Every batch of one epoch (one worker process: the main one), device path decoded on the CPU."""
    cfg = DataConfig(
        train_shards=[str(root)], batch_size=batch_size, shuffle_buffer=4, decode_on=decode_on, augment=augment
    )
    stream = build_stream(cfg, FakeModel(), cfg.train_shards, train=True, seed=5)
    stream.drop_last = False
    decoder = device_decoder(cfg, FakeModel(), "cpu", train=True) if decode_on == "device" else None
    out, skipped = [], {}
    for batch in make_loader(stream, num_workers=0):
        skipped.update(batch.skipped)  # the worker's running counts
        if decoder is not None:
            assert batch.images is None and ENCODED_VIEW in batch.views
            batch, device_skips = decoder(batch)
            for k, v in device_skips.items():
                skipped[f"device_{k}"] = skipped.get(f"device_{k}", 0) + v
        out.append(batch)
    return out, skipped


def pixel_diff(a, b) -> torch.Tensor:
    """|a - b| in 0-255 pixel levels, from normalised images."""
    std = torch.tensor(FakeModel().preprocess_cfg()["std"]).view(1, 3, 1, 1) * 255
    return ((a - b) * std).abs()


def compare(root: Path, augment: bool = True) -> torch.Tensor:
    workers, _ = batches(root, "workers", augment=augment)
    device, _ = batches(root, "device", augment=augment)
    assert [b.keys for b in device] == [b.keys for b in workers]
    assert [b.captions for b in device] == [b.captions for b in workers]  # same caption draws from the same RNG
    for w, d in zip(workers, device):
        assert torch.equal(w.text, d.text) and d.images.shape == w.images.shape and d.images.dtype == torch.float32
    return pixel_diff(torch.cat([b.images for b in device]), torch.cat([b.images for b in workers]))


def test_device_path_gives_the_worker_paths_batch(tmp_path):
    """Full-scale JPEGs (RGB, grey, every EXIF orientation on non-square images) and a PNG: same crops, same pixels
    (libjpeg-turbo in both decoders, the same uint8 antialiased bicubic resize on the CPU)."""
    images = [("jpg", encode(picture(i, 26 + i % 5, 20 + i % 7))) for i in range(10)]
    images += [("jpg", encode(picture(20 + o, 27, 21), orientation=o)) for o in range(1, 9)]
    images += [("jpg", encode(picture(30, 25, 22).convert("L"))), ("png", encode(picture(31, 23, 29), "PNG"))]
    root = write_shards(tmp_path / "shards", images)
    for augment in (True, False):  # random crops, and the centre crop
        diff = compare(root, augment)
        assert diff.max() <= 1.0 + 1e-3, f"max {diff.max():.3f} levels"  # measured: 0 (identical)
        assert diff.mean() <= 1e-3


def test_device_path_matches_reduced_scale_decoding(tmp_path):
    """Large JPEGs: the workers decode them at 1/2-1/8 scale (DCT scaling) and crop there; the device decodes full
    size, averages scale x scale blocks and takes the same crop: pixels within a few levels of each other."""
    images = [("jpg", encode(picture(i, 100 + 7 * i, 70 + 5 * i))) for i in range(16)]
    root = write_shards(tmp_path / "shards", images)
    diff = compare(root)
    # measured: mean 1.50, 99th percentile 6.0, max 14 levels (block means stand in for libjpeg's scaled IDCT);
    # cropping the full-size image without the block means: mean 5-12; a crop one pixel off: 12-50
    assert diff.mean() < 2.0, f"mean {diff.mean():.2f} levels"
    assert diff.flatten().quantile(0.99) < 8.0


def test_corrupt_and_unreadable_images_are_counted_not_fatal(tmp_path):
    good = [("jpg", encode(picture(i, 30, 24))) for i in range(10)]
    images = [
        *good[:3],
        ("jpg", truncated(encode(picture(99, 30, 24)))),
        *good[3:6],
        ("jpg", b"<html>not found</html>"),
        *good[6:],
    ]
    root = write_shards(tmp_path / "shards", images, per_shard=12)
    workers, worker_skips = batches(root, "workers", batch_size=4)
    device, device_skips = batches(root, "device", batch_size=4)
    assert worker_skips == {"corrupt_image": 1, "not_an_image": 1}
    # the header-only check stays in the workers; the truncated file is found (and dropped) by the device decoder
    assert device_skips == {"not_an_image": 1, "device_corrupt_image": 1}
    assert sorted(k for b in device for k in b.keys) == sorted(k for b in workers for k in b.keys)
    assert all(len(b.keys) == b.images.shape[0] == b.text.shape[0] for b in device)


def test_pixel_limit_is_read_from_the_header(tmp_path):
    images = [
        ("jpg", encode(picture(1, 30, 24))),
        ("jpg", encode(picture(2, 90, 90))),
        ("png", encode(picture(3, 90, 90), "PNG")),
    ]
    root = write_shards(tmp_path / "shards", images)
    cfg = DataConfig(train_shards=[str(root)], batch_size=4, shuffle_buffer=0, decode_on="device", max_pixels=1000)
    stream = build_stream(cfg, FakeModel(), cfg.train_shards, train=True)
    stream.drop_last = False
    (batch,) = list(make_loader(stream, num_workers=0))
    assert batch.skipped == {"too_many_pixels": 2} and len(batch.keys) == 1


def test_device_skips_are_saved_with_the_data_state():
    state = StreamState()
    state.add_skips({"corrupt_image": 2})
    state.skipped = {0: {"corrupt_image": 1, "not_an_image": 1}}
    restored = StreamState.from_dict(state.to_dict())
    assert restored.skip_totals() == {"corrupt_image": 3, "not_an_image": 1}
    restored.next_epoch(1)
    assert restored.skip_totals() == {"corrupt_image": 3, "not_an_image": 1} and not restored.device_skipped
    old = state.to_dict()
    del old["device_skipped"]  # checkpoints written before the option
    assert StreamState.from_dict(old).device_skipped == {}


def test_bad_setting_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_experiment(None, ["data.decode_on=gpu"])
    assert "data.decode_on" in str(e.value) and "\n" not in str(e.value)


TINY = [
    "model.preset=clip-tiny",
    "train.trackers=[none]",
    "train.progress=false",
    "train.warmup_steps=1",
    "train.lr=1e-3",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.decode_on=device",
]


def test_training_runs_with_device_decoding(tmp_path):
    from mmcl.engine.metrics import read_metrics
    from mmcl.engine.trainer import train

    images = [("jpg", encode(picture(i, 40 + i % 9, 36 + i % 5))) for i in range(40)]
    images[5] = ("jpg", truncated(encode(picture(5, 40, 36))))  # decoded (and dropped) on the device
    images[17] = ("png", encode(picture(17, 40, 36), "PNG"))
    root = write_shards(tmp_path / "shards", images, per_shard=20)
    out = tmp_path / "run"
    cfg = load_experiment(None, [*TINY, f"data.train_shards=[{root}]", f"train.output_dir={out}", "train.steps=6"])
    cfg.train.log_every = 3
    result = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert result.step == 6 and [r["step"] for r in rows] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["skipped_corrupt_image"] >= 1  # 6 steps x 8 > one epoch of 39: the bad file was met


def test_terms_needing_image_views_are_refused(tmp_path):
    from mmcl.engine.trainer import Trainer

    root = write_shards(tmp_path / "shards", [("jpg", encode(picture(0, 30, 30)))])
    cfg = load_experiment(None, [*TINY, f"data.train_shards=[{root}]", f"train.output_dir={tmp_path / 'run'}"])
    cfg.loss = load_experiment(None, ["loss.terms=[clip, simclr]"]).loss
    with pytest.raises(UserError, match="loss term 'simclr'") as e:
        Trainer(cfg)
    assert "\n" not in str(e.value)


def test_two_processes_keep_equal_batches(tmp_path):
    """torchrun, 2 gloo processes: one rank drops a JPEG that fails on the device, the other trims its batch to
    match (the contrastive gather needs equal rows); both are counted and training goes on."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from mmcl.engine.metrics import read_metrics

    images = [("jpg", encode(picture(i, 40, 36))) for i in range(48)]
    images[3] = ("jpg", truncated(encode(picture(3, 40, 36))))  # shard 0 only
    root = write_shards(tmp_path / "shards", images, per_shard=24)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "mmcl.cli", "train", "-", *TINY, f"data.train_shards=[{root}]", "data.shuffle_buffer=0"]
    cmd += ["train.steps=3", "train.log_every=3", "train.ckpt_every=3", f"train.output_dir={out}", "--no-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = read_metrics(out / "metrics.jsonl")
    assert np.isfinite(row["loss"])
    assert row["skipped_corrupt_image"] == 1 and row["skipped_trimmed_to_match_ranks"] == 1
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    states = [json.loads((ckpt / f"rank{r}.json").read_text())["data"] for r in range(2)]
    assert sorted(s["device_skipped"].get("corrupt_image", 0) for s in states) == [0, 1]
