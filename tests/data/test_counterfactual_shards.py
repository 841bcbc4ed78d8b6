"""Counterfactual images in shards: `KEY.cf.<ext>` + `KEY.cf.txt` (+ `KEY.cf.json`) written by the synthetic
source on request (CLI as typed), read by the loader into the `counterfactual` term's view, a bad one counted
as 'bad_counterfactual' with its sample kept."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import torch
from PIL import Image

from mmcl.cli import main
from mmcl.config import DataConfig
from mmcl.data.counterfactual import EDITS, counterfactual
from mmcl.data.pipeline import SampleDecoder, build_stream
from mmcl.data.reader import wanted_member
from mmcl.data.shards import StreamState, make_loader
from mmcl.data.synthetic import generate
from mmcl.data.transforms import ImageTransform
from mmcl.data.views import CounterfactualView


class FakeModel:
    """Just what the data pipeline asks of a model."""

    def preprocess_cfg(self):
        return {"image_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def tokenizer(self, texts):
        ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
        return ids, torch.ones_like(ids)


def members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} with the key cut at the first dot, as webdataset groups members."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def pixels(image: bytes | Image.Image) -> torch.Tensor:
    image = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float).view(image.height, image.width, 3)


def test_the_reader_keeps_counterfactual_members() -> None:
    for name in ("000000001.cf.png", "000000001.cf.jpg", "000000001.cf.webp", "000000001.cf.txt", "x.cf.json"):
        assert wanted_member(name), name
    assert not wanted_member("000000001.cf.pkl")


def test_cli_writes_one_seeded_counterfactual_per_sample(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cf"
    args = ["shards", "synthetic", str(out), "--n", "24", "--image-size", "32", "--counterfactuals", "--no-progress",
            "--format", "png"]  # fmt: skip
    assert main(args) == 0
    samples = members(out / "00000.tar")
    assert len(samples) == 24
    with_cf = 0
    for key, parts in samples.items():
        index = json.loads(parts["json"])["index"]
        cf_parts = {ext for ext in parts if ext.startswith("cf.")}
        if not cf_parts:  # no edit applies to this scene: no counterfactual member at all
            assert all(counterfactual(index, e, image_size=32) is None for e in EDITS), key
            continue
        with_cf += 1
        assert cf_parts == {"cf.png", "cf.txt", "cf.json"}, cf_parts
        edit = json.loads(parts["cf.json"])["edit"]
        expected = counterfactual(index, edit, image_size=32)
        assert expected is not None and parts["cf.txt"].decode() == expected.caption
        assert expected.caption != parts["txt"].decode()
        cf_image = pixels(parts["cf.png"])  # the edited scene, lossless, and not the original picture
        assert cf_image.shape == (32, 32, 3) and torch.equal(cf_image, pixels(expected.image))
        assert not torch.equal(cf_image, pixels(parts["png"]))
    assert with_cf >= 18, with_cf
    # the same command again: the choice is seeded, the output byte-identical
    again = tmp_path / "again"
    assert main([*args[:2], str(again), *args[3:]]) == 0
    assert (again / "00000.tar").read_bytes() == (out / "00000.tar").read_bytes()
    # without the flag: no counterfactual members
    assert (
        main(["shards", "synthetic", str(tmp_path / "plain"), "--n", "8", "--image-size", "32", "--no-progress"]) == 0
    )
    assert not any(ext.startswith("cf.") for p in members(tmp_path / "plain" / "00000.tar").values() for ext in p)


def test_loader_workers_build_the_view_with_the_main_images_augmentation(tmp_path: Path) -> None:
    out = tmp_path / "cf"
    assert main(["shards", "synthetic", str(out), "--n", "16", "--image-size", "32", "--counterfactuals",
                 "--no-progress"]) == 0  # fmt: skip
    view = CounterfactualView(FakeModel().tokenizer)
    cfg = DataConfig(batch_size=16, shuffle_buffer=0)
    stream = build_stream(cfg, FakeModel(), [str(out / "00000.tar")], train=True, views={"counterfactual/cf": view})
    batch = next(iter(make_loader(stream, num_workers=1, state=StreamState())))
    raw = members(out / "00000.tar")
    valid = batch.views["counterfactual/cf/valid"]
    assert valid.dtype == torch.bool and valid.tolist() == [
        any(e.startswith("cf.") for e in raw[k]) for k in batch.keys
    ]
    assert batch.views["counterfactual/cf/image"].shape == batch.images.shape
    assert batch.views["counterfactual/cf/text"].shape == (16, 2)
    assert batch.views["counterfactual/cf/image"][~valid].abs().sum() == 0
    # the counterfactual gets the same crop/flip draws as the main image: decoded with the main image's transform
    # and the per-sample RNG replayed, one sample's view is exactly the cf image through that transform
    transform = stream.sample_fn.transform
    i = int(valid.nonzero()[0])
    sample = {"__key__": batch.keys[i], **raw[batch.keys[i]]}
    assert isinstance(transform, ImageTransform) and transform.train  # random crops: the draws matter
    decoded = SampleDecoder(transform, image_views={"cf": view})(sample, random.Random(123))
    expected = transform(Image.open(io.BytesIO(sample["cf.jpg"])).convert("RGB"), random.Random(123))
    torch.testing.assert_close(decoded["views"]["cf/image"], expected)
    other_draws = transform(Image.open(io.BytesIO(sample["cf.jpg"])).convert("RGB"), random.Random(7))
    assert not torch.equal(other_draws, expected)


def test_a_corrupt_counterfactual_is_counted_and_its_sample_kept(tmp_path: Path) -> None:
    s = generate(0, image_size=16)
    buf = io.BytesIO()
    s.image.save(buf, "PNG")
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        parts = {
            "a.png": buf.getvalue(), "a.txt": b"a red circle", "a.cf.png": buf.getvalue()[:40], "a.cf.txt": b"x",
            "b.png": buf.getvalue(), "b.txt": b"a red circle", "b.cf.png": buf.getvalue(), "b.cf.txt": b"a blue circle",
            "c.png": buf.getvalue(), "c.txt": b"a red circle", "c.cf.txt": b"a caption without its image",
        }  # fmt: skip
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    view = CounterfactualView(FakeModel().tokenizer)
    cfg = DataConfig(batch_size=3, shuffle_buffer=0)
    stream = build_stream(cfg, FakeModel(), [str(tar_path)], train=False, views={"t/cf": view})
    batch = next(iter(make_loader(stream, num_workers=1, state=StreamState())))
    assert batch.keys == ["a", "b", "c"]  # every sample kept
    assert batch.views["t/cf/valid"].tolist() == [False, True, False]
    assert batch.skipped == {"bad_counterfactual": 2}
