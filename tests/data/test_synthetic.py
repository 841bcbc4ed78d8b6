"""The built-in synthetic captioned-shape generator."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from mmcl.data.synthetic import (
    BACKGROUNDS,
    CLASSNAMES,
    COLOURS,
    LINES,
    POSITIONS,
    SHAPES,
    attributes_in_caption,
    generate,
    iter_synthetic,
)

ATTRS = ("colour", "shape", "size", "position", "count", "background")


@pytest.fixture(scope="module")
def samples():
    return list(iter_synthetic(800, split="train", image_size=32))


def test_classnames_are_colour_times_shape():
    assert len(CLASSNAMES) == len(COLOURS) * len(SHAPES) == 40
    assert len(set(CLASSNAMES)) == 40
    assert CLASSNAMES[0] == "red circle"
    s = generate(3)
    assert CLASSNAMES[s.label] == s.classname == f"{s.attributes['colour']} {s.attributes['shape']}"


def test_deterministic_by_seed_split_and_index():
    a, b = generate(7, seed=0, image_size=48), generate(7, seed=0, image_size=48)
    assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.attributes == b.attributes
    assert a.image.size == (48, 48) and a.image.mode == "RGB"
    for other in (
        generate(7, seed=1, image_size=48),
        generate(7, split="val", image_size=48),
        generate(8, image_size=48),
    ):
        assert other.image.tobytes() != a.image.tobytes()


def test_splits_are_disjoint_streams():
    train = {generate(i, split="train", image_size=32).image.tobytes() for i in range(100)}
    val = {generate(i, split="val", image_size=32).image.tobytes() for i in range(100)}
    assert len(train) == len(val) == 100
    assert not train & val
    # not a shifted copy of the same stream either
    assert [generate(i, split="val").caption for i in range(20)] != [generate(i + 1).caption for i in range(20)]


def test_all_classes_and_attribute_values_occur(samples):
    labels = Counter(s.label for s in samples)
    assert set(labels) == set(range(40))
    assert max(labels.values()) < 3 * min(labels.values())  # roughly balanced
    assert {s.attributes["count"] for s in samples} == {1, 2, 3}
    assert {s.attributes["size"] for s in samples} == {"small", "large"}
    assert {s.attributes["position"] for s in samples if s.attributes["count"] == 1} == set(POSITIONS)
    assert {s.attributes["position"] for s in samples if s.attributes["count"] > 1} == set(LINES)
    assert {s.attributes["background"] for s in samples} == set(BACKGROUNDS)
    with_distractor = [s for s in samples if s.distractor]
    assert 0.05 * len(samples) < len(with_distractor) < 0.4 * len(samples)
    for s in with_distractor:
        assert s.distractor in CLASSNAMES and s.distractor != s.classname
        # only beside a group or a large object, so the main object stays unambiguous
        assert s.attributes["count"] > 1 or s.attributes["size"] == "large"


def test_captions_name_the_label_and_vary(samples):
    for s in samples:
        colour, shape = s.attributes["colour"], s.attributes["shape"]
        assert colour in s.caption and shape[:-1] in s.caption, s.caption  # "cross" also as "crosses"
        if s.distractor and s.distractor in s.caption:  # the main object is named first
            assert s.caption.index(f"{colour} {shape[:-1]}") < s.caption.index(s.distractor), s.caption
    captions = [s.caption for s in samples]
    assert len(set(captions)) > 0.6 * len(captions)
    # attributes are sometimes left out: position and size are not always named
    parsed = [attributes_in_caption(c) for c in captions]
    for attr in ("size", "position", "background"):
        named = sum(p[attr] is not None for p in parsed) / len(parsed)
        assert 0.1 < named < 0.95, (attr, named)
    assert {c.split()[0] for c in captions} >= {"a", "an", "there", "two", "three"}


def test_attributes_in_caption_round_trips(samples):
    for s in samples:
        found = attributes_in_caption(s.caption)
        assert set(found) == set(ATTRS)
        assert found["colour"] == s.attributes["colour"] and found["shape"] == s.attributes["shape"], s.caption
        for attr in ATTRS:
            assert found[attr] is None or found[attr] == s.attributes[attr], (attr, s.caption, s.attributes)


@pytest.mark.parametrize(
    "caption, expected",
    [
        (
            "two small blue squares on a gray background",
            dict(colour="blue", shape="square", size="small", count=2, background="gray"),
        ),
        (
            "a large red circle in the upper left corner",
            dict(colour="red", shape="circle", size="large", count=1, position="top left"),
        ),
        (
            "a picture of three green stars near the bottom",
            dict(colour="green", shape="star", count=3, position="bottom"),
        ),
        ("some big white crosses in the middle", dict(colour="white", shape="cross", size="large", position="center")),
        ("a cat sitting on a mat", {}),
    ],
)
def test_attributes_in_caption_examples(caption, expected):
    found = attributes_in_caption(caption)
    assert found == {attr: expected.get(attr) for attr in ATTRS}


def test_pixels_show_the_main_object(samples):
    """The main colour is painted, and large objects cover more pixels than small ones."""
    area = {"small": [], "large": []}
    for s in samples[:300]:
        pixels = np.asarray(s.image).astype(np.int32)
        near = np.abs(pixels - np.array(COLOURS[s.attributes["colour"]])).max(axis=-1) < 45
        assert near.sum() >= 4, (s.caption, near.sum())
        area[s.attributes["size"]].append(near.sum() / s.attributes["count"])
    assert np.mean(area["large"]) > 2 * np.mean(area["small"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate(0, split="training")
    with pytest.raises(ValueError, match="index"):
        generate(-1)


def test_generation_speed_report():
    """Sanity check of the render speed (printed, not asserted: the test machines are shared)."""
    start = time.process_time()
    images = [generate(i, image_size=64).image for i in range(300)]
    rate = len(images) / max(time.process_time() - start, 1e-9)
    print(f"synthetic generation: {rate:.0f} images/s of CPU time at 64 px")
    assert len({im.tobytes() for im in images}) == 300
