"""Compositional eval: SugarCrepe's file format, negatives generated from the shapes' attributes, scoring, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmcl.cli
from mmcl.data.synthetic import POSITIONS, attributes_in_caption, generate
from mmcl.eval.compositional import (
    CHANCE,
    SUGARCREPE_SUBSETS,
    generated_pairs,
    run_compositional,
    sugarcrepe_pairs,
    synthetic_samples,
)
from mmcl.eval.compositional_shapes import SUBSETS, shape_negatives
from mmcl.utils import UserError

RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 225)}


class ColourEncoder:
    """Images -> their mean colour; texts -> the colour words they name. Counts what it encodes."""

    def __init__(self) -> None:
        self.images = 0
        self.texts: list[str] = []

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        self.images += len(images)
        means = torch.stack([torch.tensor(im.convert("RGB").resize((4, 4)).getdata()).float().mean(0) for im in images])
        return F.normalize(means, dim=-1)  # (N, 3)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts.extend(texts)
        rows = [sum((torch.tensor(v).float() for k, v in RGB.items() if k in t), torch.ones(3)) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


# ----------------------------------------------------------------------------- SugarCrepe's format


@pytest.fixture
def sugarcrepe(tmp_path: Path) -> tuple[Path, Path]:
    """Two subset files in SugarCrepe's exact layout (`data/<subset>.json`: {"0": {filename, caption,
    negative_caption}, ...}) and COCO-style image files; one image shared by both subsets."""
    data, images = tmp_path / "sugar-crepe" / "data", tmp_path / "val2017"
    data.mkdir(parents=True)
    images.mkdir()
    for i, colour in enumerate(RGB):
        Image.new("RGB", (48, 40), RGB[colour]).save(images / f"{i + 1:012d}.jpg")
    replace_att = {
        "0": {"filename": "000000000001.jpg", "caption": "A red bus on a street.", "negative_caption": "A blue bus."},
        "1": {"filename": "000000000002.jpg", "caption": "A green field.", "negative_caption": "A red field."},
        "2": {"filename": "000000000003.jpg", "caption": "A red sky.", "negative_caption": "A blue sky."},  # wrong
        "3": {"filename": "000000000003.jpg", "caption": "A blue kite.", "negative_caption": "A green kite."},
    }
    swap_obj = {
        "0": {"filename": "000000000001.jpg", "caption": "red over green", "negative_caption": "green over blue"},
    }
    (data / "replace_att.json").write_text(json.dumps(replace_att, indent=4))
    (data / "swap_obj.json").write_text(json.dumps(swap_obj, indent=4))
    return data, images


def test_sugarcrepe_files_are_read_and_scored(sugarcrepe):
    data, images = sugarcrepe
    pairs = sugarcrepe_pairs(data, images)
    assert pairs.counts() == {"replace_att": 4, "swap_obj": 1}
    assert [p[0] for p in pairs.pairs] == ["replace_att"] * 4 + ["swap_obj"]  # SugarCrepe's subset order
    assert pairs.pairs[0] == ("replace_att", "000000000001.jpg", "A red bus on a street.", "A blue bus.")
    enc = ColourEncoder()
    res = run_compositional(enc.encode_images, enc.encode_texts, pairs, batch_size=2)
    assert res["metrics"]["replace_att"] == 0.75 and res["metrics"]["swap_obj"] == 1.0
    assert res["metrics"]["mean"] == pytest.approx(0.875) and res["metrics"]["n_pairs"] == 5
    assert res["chance"] == CHANCE == 0.5
    assert enc.images == 3  # each image encoded once, though pairs share them
    assert len(enc.texts) == len(set(enc.texts)) == 10
    wrong = [p for p in res["predictions"] if not p["correct"]]
    assert [(p["caption"], p["negative"]) for p in wrong] == [("A red sky.", "A blue sky.")]
    assert wrong[0]["score"] < wrong[0]["negative_score"]
    only = sugarcrepe_pairs(data, images, subsets=["swap_obj"])
    assert only.counts() == {"swap_obj": 1}
    assert sugarcrepe_pairs(data, images, max_per_subset=2).counts() == {"replace_att": 2, "swap_obj": 1}


def test_sugarcrepe_errors(sugarcrepe, tmp_path):
    data, images = sugarcrepe
    with pytest.raises(UserError, match="no SugarCrepe subset file"):
        sugarcrepe_pairs(tmp_path / "val2017", images)
    with pytest.raises(UserError, match="add_obj.json: no such subset file"):
        sugarcrepe_pairs(data, images, subsets=["add_obj"])
    with pytest.raises(UserError, match="not found"):
        sugarcrepe_pairs(data, tmp_path)  # wrong image folder
    (data / "add_att.json").write_text('{"0": {"filename": "../secret.jpg", "caption": "a", "negative_caption": "b"}}')
    (tmp_path / "secret.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="outside"):
        sugarcrepe_pairs(data, images, subsets=["add_att"])
    (data / "add_att.json").write_text('{"0": {"filename": "000000000001.jpg", "caption": "a"}}')
    with pytest.raises(UserError, match="negative_caption"):
        sugarcrepe_pairs(data, images, subsets=["add_att"])
    (data / "add_att.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not JSON"):
        sugarcrepe_pairs(data, images, subsets=["add_att"])
    assert set(SUGARCREPE_SUBSETS) == {
        "replace_obj",
        "replace_att",
        "replace_rel",
        "swap_obj",
        "swap_att",
        "add_obj",
        "add_att",
    }


# ----------------------------------------------------------------------------- generated from the shapes


KEYS = ("colour", "shape", "size", "position", "count", "background")


def _info(s) -> dict:
    return {"attributes": s.attributes, "distractor": s.distractor, "distractor_position": s.distractor_position}


def _changed(a: str, b: str) -> set[str]:
    pa, pb = attributes_in_caption(a), attributes_in_caption(b)
    return {k for k in KEYS if pa[k] != pb[k]}


def _names_distractor(s) -> bool:
    d = s.distractor
    return d is not None and any(
        s.caption.endswith(f" {c} {'an' if d[0] in 'aeiou' else 'a'} {d}") for c in ("and", "next to")
    )


def test_every_negative_changes_exactly_its_attribute_and_is_false_of_the_image():
    samples = [generate(i, image_size=8, split="val") for i in range(600)]
    counts = dict.fromkeys(SUBSETS, 0)
    for s in samples:
        neg = shape_negatives(s.caption, _info(s), random.Random(s.meta["index"]))
        for subset, caption in neg.items():
            counts[subset] += 1
            assert caption != s.caption
        a, d = s.attributes, s.distractor.split() if s.distractor else (None, None)
        got = {k: attributes_in_caption(v) for k, v in neg.items()}

        assert _changed(s.caption, neg["replace_colour"]) == {"colour"}, (s.caption, neg["replace_colour"])
        assert got["replace_colour"]["colour"] != a["colour"]
        assert (got["replace_colour"]["colour"], a["shape"]) != tuple(d)  # the distractor would make it true

        assert _changed(s.caption, neg["replace_shape"]) == {"shape"}, (s.caption, neg["replace_shape"])
        assert (a["colour"], got["replace_shape"]["shape"]) != tuple(d)

        assert _changed(s.caption, neg["change_count"]) == {"count"}, (s.caption, neg["change_count"])
        assert got["change_count"]["count"] != a["count"]

        if "change_position" in neg:
            assert _changed(s.caption, neg["change_position"]) == {"position"}, (s.caption, neg["change_position"])
            new = got["change_position"]["position"]
            if a["count"] == 1:  # shares no direction with the true cell
                assert not set(new.split()) & set(a["position"].split()), (s.caption, neg["change_position"])
            else:  # a parallel line
                lines = ({"top", "center", "bottom"}, {"left", "right"})
                assert any({new, a["position"]} <= line for line in lines) and new != a["position"]

        for subset in ("swap_att", "swap_obj"):
            if subset in neg:
                words = lambda t: sorted(w for w in t.split() if w not in ("is", "are", "a", "an"))  # noqa: E731
                assert words(neg[subset]) == words(s.caption), (s.caption, neg[subset])
        if "swap_att" in neg:  # the colours trade places, the shapes stay
            assert got["swap_att"]["colour"] == d[0] and got["swap_att"]["shape"] == a["shape"]
            assert neg["swap_att"].endswith(f"{a['colour']} {d[1]}")
            assert d[0] != a["colour"] and d[1] != a["shape"]
        if "swap_obj" in neg:  # the distractor takes the main object's place before the position phrase
            assert got["swap_obj"]["colour"] == d[0] and got["swap_obj"]["shape"] == d[1]
            if a["count"] == 1:
                assert not set(s.distractor_position.split()) & set(a["position"].split())
            else:  # the generator keeps a group's line free of the distractor
                assert s.distractor_position not in _line_cells(a["position"])

    # counts per subset, recomputed from the samples themselves
    n = len(samples)
    assert counts["replace_colour"] == counts["replace_shape"] == counts["change_count"] == n
    assert counts["change_position"] == sum(attributes_in_caption(s.caption)["position"] is not None for s in samples)
    named = [s for s in samples if _names_distractor(s)]
    assert counts["swap_att"] == sum(
        s.distractor.split()[0] != s.attributes["colour"] and s.distractor.split()[1] != s.attributes["shape"]
        for s in named
    )
    assert 0 < counts["swap_obj"] <= len(named) and counts["swap_att"] > 20


def _line_cells(line: str) -> set[str]:
    from mmcl.data.synthetic import LINES

    return {name for name, cell in POSITIONS.items() if cell in LINES[line]}


def test_generated_pairs_are_capped_reproducible_and_need_attributes():
    a = generated_pairs(synthetic_samples(200, image_size=16), max_per_subset=6)
    b = generated_pairs(synthetic_samples(200, image_size=16), max_per_subset=6)
    assert a.pairs == b.pairs and a.counts() == dict.fromkeys(SUBSETS, 6)
    assert list(a.counts()) == list(SUBSETS)
    assert set(a.images) == {image for _, image, _, _ in a.pairs}
    from mmcl.eval.datasets import EvalSample

    plain = [
        EvalSample(key=str(i), image=Image.new("RGB", (8, 8)), captions=["a cat"], meta={"label": 1}) for i in range(3)
    ]
    with pytest.raises(UserError, match="no known attributes"):
        generated_pairs(plain)


def test_shards_of_the_builtin_shapes_carry_what_the_generator_needs(tmp_path):
    from mmcl.data.writer import write_synthetic_shards
    from mmcl.eval.datasets import open_eval_dataset

    write_synthetic_shards(tmp_path / "val", 80, split="val", image_size=16, maxcount=40)
    from_shards = generated_pairs(open_eval_dataset(str(tmp_path / "val")))
    direct = generated_pairs(synthetic_samples(80, split="val", image_size=16))
    # the same samples, so the same subsets (the choices differ: they are seeded by the sample key)
    assert from_shards.counts() == direct.counts()
    assert [c for _, _, c, _ in from_shards.pairs] == [c for _, _, c, _ in direct.pairs]


# ----------------------------------------------------------------------------- scoring on a tiny model


def test_scores_match_a_plain_cosine_loop_on_a_tiny_model():
    from mmcl.config import load_experiment
    from mmcl.inference import Pipeline
    from mmcl.models import build_model

    torch.manual_seed(0)
    model = build_model(load_experiment(None, ["model.preset=clip-tiny"]).model).eval()
    pipe = Pipeline.from_model(model)
    pairs = generated_pairs(synthetic_samples(120, image_size=32), max_per_subset=4)
    res = run_compositional(pipe.encode_images, pipe.encode_texts, pairs, batch_size=5, text_batch_size=7)

    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for (subset, image, caption, negative), pred in zip(pairs.pairs, res["predictions"]):
            x = pipe.preprocess(pairs.images[image])[None]
            img = model.encode_image(x)[0]
            img = img / img.norm()
            ids, mask = model.tokenizer([caption, negative])
            txt = model.encode_text(ids, mask)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            pos, neg = float(txt[0] @ img), float(txt[1] @ img)
            assert pred["score"] == pytest.approx(pos, abs=1e-5) and pred["negative_score"] == pytest.approx(
                neg, abs=1e-5
            )
            right.setdefault(subset, []).append(pos > neg)
    for subset, ok in right.items():
        assert res["metrics"][subset] == sum(ok) / len(ok)
    assert res["metrics"]["mean"] == pytest.approx(sum(res["metrics"][s] for s in right) / len(right))


# ----------------------------------------------------------------------------- CLI and report


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    from mmcl.config import load_experiment, save_yaml
    from mmcl.engine.checkpoint import save_model
    from mmcl.models import build_model

    cfg = load_experiment(None, ["model.preset=clip-tiny"])
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    torch.manual_seed(0)
    save_model(build_model(cfg.model), run / "final" / "model.safetensors")
    return run


def test_cli_generated_and_sugarcrepe(tiny_run, tmp_path, sugarcrepe, capsys):
    from mmcl.data.writer import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shapes", 120, split="val", image_size=32, maxcount=60)
    rc = mmcl.cli.main(
        ["eval", "compositional", str(tiny_run), "--shards", str(tmp_path / "shapes"), "--max-pairs", "5", "--quiet"]
    )
    assert rc == 0
    out = tiny_run / "eval" / "compositional"
    summary = json.loads((out / "eval.json").read_text())
    assert set(summary["subsets"]) == set(SUBSETS) and summary["chance"] == 0.5
    assert all(e["pairs"] == 5 for e in summary["subsets"].values()) and summary["metrics"]["n_pairs"] == 30
    assert all(0 <= summary["metrics"][s] <= 1 for s in SUBSETS)
    md = (out / "eval.md").read_text()
    assert "| replace_colour | 5 |" in md and "chance is 50%" in md
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 30
    assert (out / "examples.png").is_file()
    assert "mean over subsets" in capsys.readouterr().out

    data, images = sugarcrepe
    report = tmp_path / "sc"
    argv = ["eval", "compositional", str(tiny_run), "--sugarcrepe", str(data), "--images", str(images)]
    assert mmcl.cli.main([*argv, "--out", str(report), "--quiet"]) == 0
    summary = json.loads((report / "eval.json").read_text())
    assert {k: e["pairs"] for k, e in summary["subsets"].items()} == {"replace_att": 4, "swap_obj": 1}

    assert mmcl.cli.main(["eval", "compositional", str(tiny_run), "--sugarcrepe", str(data)]) == 2
    assert mmcl.cli.main(["eval", "compositional", str(tiny_run)]) == 2
    assert "either --shards" in capsys.readouterr().err
