"""Counterfactual scenes: one edit each, the rest of the picture untouched, captions that tell them apart."""

import numpy as np
import pytest

from mmcl.data.counterfactual import EDITS, counterfactual
from mmcl.data.synthetic import POSITIONS, attributes_in_caption, generate, render_scene, scene_of

N = 120


def changed_share(a, b) -> float:
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).sum(-1)
    return float((diff > 0).mean())


def test_an_unedited_scene_renders_the_original_sample():
    for i in range(20):
        s = generate(i, split="test")
        again = render_scene(scene_of(i, split="test"), i, split="test")
        assert again.caption == s.caption and np.array_equal(np.asarray(again.image), np.asarray(s.image))


@pytest.mark.parametrize("subset", list(EDITS))
def test_each_edit_changes_one_thing(subset):
    made = 0
    for i in range(N):
        cf = counterfactual(i, subset, split="test")
        if cf is None:
            continue
        made += 1
        o, scene = generate(i, split="test"), scene_of(i, split="test")
        a, b = o.attributes, cf.attributes
        assert cf.caption != o.caption and cf.distractor != cf.classname
        share = changed_share(o.image, cf.image)
        assert 0 < share < 0.6  # the objects moved or changed; the background and its noise did not
        same = {k for k in a if a[k] == b[k]}
        if subset == "replace_colour":
            assert same == set(a) - {"colour"} and attributes_in_caption(cf.caption)["colour"] == b["colour"]
        elif subset == "replace_shape":
            assert same == set(a) - {"shape"} and attributes_in_caption(cf.caption)["shape"] == b["shape"]
        elif subset == "swap_att":
            d_colour, d_shape = o.distractor.split()
            assert (
                b["colour"] == d_colour and cf.distractor == f"{a['colour']} {d_shape}" and same >= {"shape", "count"}
            )
        elif subset == "swap_obj":
            assert cf.distractor == o.distractor and POSITIONS[b["position"]] == scene.d_cell
            assert cf.distractor_position == a["position"]
        elif subset == "change_count":
            assert {a["count"], b["count"]} == {2, 3} and same == set(a) - {"count"}
        elif subset == "change_position":
            assert same == set(a) - {"position"} and not set(a["position"].split()) & set(b["position"].split())
    assert made >= 5, f"{subset}: only {made} of {N} scenes had a counterfactual"


def test_unknown_edit_is_refused():
    with pytest.raises(ValueError, match="unknown counterfactual edit"):
        counterfactual(0, "swap_everything")
