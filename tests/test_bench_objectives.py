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


def test_the_table_renders_for_every_caption_mode_and_averages_speed_over_seeds() -> None:
    from bench.bench_objectives import summarise, to_markdown
    from bench.common import machine_info

    runs = [{"tower": "cnn", "objective": "clip", "seed": s, "steps": 300, "samples_per_s": v, "top1": t}
            for s, v, t in ((0, 100.0, 0.2), (1, 300.0, 0.3))]  # fmt: skip
    res = {
        "runs": runs,
        "summary": summarise(runs),
        "command": "python -m bench.bench_objectives",
        "machine": machine_info(),
    }
    for captions, title in (("full", "300 steps)"), ("shapeless", "300 steps, shapeless training captions)")):
        res["settings"] = {"budget_s": None, "steps": 300, "image_size": 32, "batch_size": 128, "workers": 2,
                           "seeds": [0, 1], "captions": captions}  # fmt: skip
        lines = to_markdown(res).splitlines()
        assert lines[0].endswith(title), lines[0]
        row = next(line for line in lines if line.startswith("| cnn | clip"))
        assert "| 200 | 25.0 (20-30) |" in row, row  # samples/s: the mean of 100 and 300
