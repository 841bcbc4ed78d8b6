"""The image transform's torch geometry against PIL's, and the loader's batch-wise normalisation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mmcl.data.decode import decode_image
from mmcl.data.pipeline import Collator, SampleDecoder, build_stream
from mmcl.data.shards import make_loader
from mmcl.data.transforms import BICUBIC, ImageTransform, random_resized_crop_box
from tests.data.test_shards import FakeModel, make_shards

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus noise (pure noise would test rounding, not geometry)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def as_array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("size,shape", [(224, (256, 256)), (64, (300, 200)), (64, (40, 90)), (32, (32, 32))])
def test_train_crop_matches_pil(size, shape):
    image = photo(*shape)
    for seed in range(4):
        got = ImageTransform(size, train=True).pixels(image, random.Random(seed))
        top, left, h, w = random_resized_crop_box(*image.size, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(seed))
        want = np.asarray(TF.resized_crop(image, top, left, h, w, [size, size], BICUBIC)).astype(int)
        assert got.dtype == torch.uint8 and got.shape == (3, size, size)
        diff = np.abs(as_array(got) - want)
        assert diff.max() <= 3 and diff.mean() < 0.05  # torch's uint8 bicubic is PIL's filter, rounded alike


@pytest.mark.parametrize("size,shape", [(224, (640, 480)), (64, (200, 300)), (64, (33, 80)), (32, (32, 32))])
def test_eval_resize_and_centre_crop_match_pil(size, shape):
    image = photo(*shape, seed=1)
    got = ImageTransform(size).pixels(image)
    want = np.asarray(TF.center_crop(TF.resize(image, size, BICUBIC), [size, size])).astype(int)
    diff = np.abs(as_array(got) - want)
    assert got.shape == (3, size, size) and diff.max() <= 3 and diff.mean() < 0.05


def test_call_is_the_normalised_pixels():
    tf = ImageTransform(48, MEAN, STD, train=True)
    image = photo(64, 60, seed=2)
    pixels = tf.pixels(image, random.Random(5))
    out = tf(image, random.Random(5))
    want = (pixels.float() - torch.tensor(MEAN).view(3, 1, 1) * 255) / (torch.tensor(STD).view(3, 1, 1) * 255)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert -2 < out.min() < out.max() < 2.2  # normalised, not 0-255


def test_collator_normalises_uint8_samples_as_the_transform_does():
    """The loader's path (uint8 per sample, normalised per batch) gives the transform's own float tensors."""
    tf = ImageTransform(32, MEAN, STD, train=True)
    raws = []
    for i in range(5):
        buf = io.BytesIO()
        photo(48, 40, seed=i).save(buf, "JPEG")
        raws.append({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": b"a caption"})
    fast = Collator(None, normalize=tf.normalize)([SampleDecoder(tf, pixels=True)(r, random.Random(1)) for r in raws])
    slow = Collator(None)([SampleDecoder(tf)(r, random.Random(1)) for r in raws])
    assert fast.images.dtype == torch.float32 and fast.images.shape == (5, 3, 32, 32)
    torch.testing.assert_close(fast.images, slow.images, rtol=1e-6, atol=1e-6)
    want = torch.stack([tf(decode_image(r["jpg"]), random.Random(1)) for r in raws])
    torch.testing.assert_close(fast.images, want, rtol=1e-6, atol=1e-6)


def test_images_are_the_same_for_any_worker_count_and_shared_from_workers(tmp_path):
    make_shards(tmp_path, 2, 6)

    def images(workers: int) -> dict[str, torch.Tensor]:
        s = build_stream_for(tmp_path)
        out = {}
        for batch in make_loader(s, workers):
            assert batch.images.dtype == torch.float32
            assert batch.images.is_shared() == (workers > 0)  # built in shared memory: no copy to send it
            out.update(zip(batch.keys, batch.images))
        return out

    zero, two = images(0), images(2)
    common = zero.keys() & two.keys()  # training drops each worker's last partial batch
    assert len(common) >= 6 and all(torch.equal(zero[k], two[k]) for k in common)


def build_stream_for(root):
    from mmcl.config import DataConfig

    data = DataConfig(train_shards=[str(root)], batch_size=4, shuffle_buffer=4)
    return build_stream(data, FakeModel(), data.train_shards, train=True, seed=3)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_decode_gives_rgb_for_any_mode(mode):
    buf = io.BytesIO()
    image = photo(20, 10).convert(mode)
    image.save(buf, "JPEG" if mode in ("L", "CMYK") else "PNG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (20, 10)
    assert ImageTransform(8).pixels(image).shape == (3, 8, 8)  # the transform converts other modes itself


@pytest.mark.parametrize("scale", [(0.8, 1.0), (0.9, 1.0)])
def test_data_crop_scale_sets_the_training_crop_area(scale):
    from mmcl.config import load_experiment
    from mmcl.data.pipeline import _transform

    cfg = load_experiment(None, [f"data.crop_scale=[{scale[0]}, {scale[1]}]"])
    assert _transform(cfg.data, FakeModel(), train=True).scale == scale
    assert _transform(cfg.data, FakeModel(), train=False).crop_box(200, 200) is None  # evaluation: centre crop
    rng = random.Random(0)
    areas = [h * w / 200**2 for _, _, h, w in (_transform(cfg.data, FakeModel(), True).crop_box(200, 200, rng)
                                                for _ in range(300))]  # fmt: skip
    assert scale[0] - 0.01 <= min(areas) and max(areas) <= 1.0
    assert min(areas) < scale[0] + 0.03  # the whole range is drawn, not just full-frame crops


@pytest.mark.parametrize("bad", ["[0.0, 1.0]", "[0.9, 0.8]", "[0.5, 1.2]", "[0.5]"])
def test_bad_crop_scale_names_the_key(bad):
    from mmcl.config import ConfigError, load_experiment

    with pytest.raises(ConfigError, match="data.crop_scale"):
        load_experiment(None, [f"data.crop_scale={bad}"])
