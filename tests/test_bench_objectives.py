"""bench_objectives' shape-free captions (`--captions shapeless`): the images keep their shapes, the captions
never name one, so only an image-side term can put shape into the image embedding."""

from __future__ import annotations

import re

from bench.bench_objectives import shapeless_caption
from mmcl.data.synthetic import PLURALS, SHAPES, generate


def test_shapeless_captions_name_no_shape_and_keep_the_rest() -> None:
    nouns = re.compile(r"\b(" + "|".join([*SHAPES, *PLURALS.values()]) + r")\b")
    seen_plural = False
    for i in range(500):
        caption = generate(i, image_size=16).caption
        out = shapeless_caption(caption)
        assert not nouns.search(out), (caption, out)
        assert nouns.sub("X", caption).replace("Xes", "X").replace("Xs", "X") == re.sub(r"\bshapes?\b", "X", out), (
            caption,
            out,
        )  # only the nouns changed
        seen_plural |= "shapes" in out
    assert seen_plural  # groups of 2-3 objects keep their plural
