"""The bundled real image sets (scikit-learn digits, skimage photographs) and their shards."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mmcl.data import real
from mmcl.data.sources import RealSource
from mmcl.data.writer import write_shards
from mmcl.utils import UserError


def test_digits_images_labels_and_captions():
    samples = list(real.digits(image_size=24))
    assert len(samples) == 1797
    assert Counter(s.meta["label"] for s in samples).keys() == set(range(10))
    for s in samples[:200]:
        assert s.image.size == (24, 24) and s.image.mode == "RGB"
        assert s.meta["classname"] == real.DIGIT_CLASSNAMES[s.meta["label"]]
        assert s.meta["classname"] in s.caption.replace(",", "").split(), s.caption
        pixels = np.asarray(s.image)
        assert pixels.mean() > 128 and pixels.min() < 100  # dark ink on white paper
    assert len({s.caption.replace(s.meta["classname"], "#").replace(str(s.meta["label"]), "#") for s in samples}) >= 5
    assert len({s.key for s in samples}) == 1797
    # the same call gives the same captions; another seed rephrases some
    again = [s.caption for s in real.digits("test", image_size=8)]
    assert again == [s.caption for i, s in enumerate(samples) if i % 5 == 0]
    assert [s.caption for s in real.digits("test", image_size=8, seed=1)] != again


def test_digits_splits_partition_the_set():
    train = {s.key for s in real.digits("train", image_size=8)}
    test = {s.key for s in real.digits("test", image_size=8)}
    assert len(train) + len(test) == 1797 and not train & test
    assert len(test) == 360
    with pytest.raises(ValueError, match="split"):
        next(real.digits("validation"))


def test_photos_load_with_hand_written_captions():
    photos = list(real.photos())
    names = {s.meta["name"] for s in photos}
    assert len(photos) == len(real.PHOTOS) - len(real.NEEDS_DOWNLOAD) >= 20  # downloads are opt-in
    assert not names & real.NEEDS_DOWNLOAD
    assert {"astronaut", "coffee", "chelsea", "rocket", "camera", "horse"} <= names
    for s in photos:
        assert s.image.mode == "RGB" and min(s.image.size) >= 64
        assert len(s.caption.split()) >= 4
        assert real.PHOTO_CLASSNAMES[s.meta["label"]] == s.meta["classname"]
    assert len({s.caption for s in photos}) == len(photos)
    horse = next(s for s in photos if s.meta["name"] == "horse")
    assert set(np.unique(np.asarray(horse.image))) <= {0, 255}  # bool mask became black and white
    only = list(real.photos(["coffee", "rocket"]))
    assert [s.meta["name"] for s in only] == ["coffee", "rocket"]


def test_real_sets_round_trip_through_shards(tmp_path):
    import webdataset as wds

    digits = RealSource("digits", split="test", image_size=16)
    summary = write_shards(digits, tmp_path / "digits", maxcount=200, progress=False)
    assert summary.samples == 360 and summary.failed == 0 and len(summary.shards) == 2
    assert (tmp_path / "digits" / "classnames.txt").read_text().split() == real.DIGIT_CLASSNAMES
    ds = wds.WebDataset([str(tmp_path / "digits" / s) for s in summary.shards], shardshuffle=False)
    rows = [(json.loads(x["json"]), x["txt"].decode()) for x in ds]
    assert [(meta["label"], caption) for meta, caption in rows] == [
        (s.meta["label"], s.caption) for s in real.digits("test", image_size=16)
    ]
    assert all(meta["width"] == 16 and meta["url"].startswith("sklearn-digits/") for meta, _ in rows)

    photos = RealSource("photos")
    summary = write_shards(photos, tmp_path / "photos", image_size=48, resize_mode="center_crop", progress=False)
    assert summary.samples == len(photos) and summary.failed == 0
    metas = [json.loads(x["json"]) for x in wds.WebDataset(str(tmp_path / "photos" / "00000.tar"), shardshuffle=False)]
    astronaut = next(m for m in metas if m["url"] == "skimage-data/astronaut")
    assert (astronaut["width"], astronaut["height"], astronaut["original_width"]) == (48, 48, 512)
    assert astronaut["classname"] == "astronaut" and "astronaut" in astronaut["caption"]


def test_unknown_real_set():
    with pytest.raises(UserError, match="unknown real image set 'mnist'"):
        RealSource("mnist")
