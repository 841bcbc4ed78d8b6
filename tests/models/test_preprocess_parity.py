"""A model's preprocessing follows its source (issue 19.6): on a non-square image, mmcl's probabilities equal
transformers' zero-shot pipeline for a tiny SigLIP (resize to a square, no crop) and a tiny CLIP (shorter side
+ centre crop), after an import, a run and an export; open_clip configs carry their resize mode both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import write_tiny_hf
from PIL import Image

from mmcl.data.transforms import ImageTransform, transform_from_preprocess
from mmcl.inference import Pipeline
from mmcl.models import build_model
from mmcl.models.pretrained import pretrained_model_config

LABELS = ["red circle", "blue square", "green star"]
TEMPLATE = "This is a photo of {}."

pytestmark = pytest.mark.usefixtures("one_thread")


def _wide_image() -> Image.Image:
    """150 x 100 px: the left and right fifths (cut off by a centre crop) differ from the middle."""
    rng = np.random.default_rng(0)
    x = np.zeros((100, 150, 3), dtype=np.uint8)
    x[:, :30] = (250, 10, 10)
    x[:, 120:] = (10, 10, 250)
    x[:, 30:120] = rng.integers(100, 140, (100, 90, 3))
    return Image.fromarray(x)


def _mmcl_probs(model: torch.nn.Module, image: Image.Image, siglip: bool) -> np.ndarray:
    pipe = Pipeline(model.eval(), None, torch.device("cpu"))
    img = pipe.encode_images([image])
    txt = pipe.encode_texts([TEMPLATE.format(x) for x in LABELS])
    scale, bias = pipe.logit_scale_and_bias()
    logits = scale * img @ txt.T
    return (torch.sigmoid(logits + bias) if siglip else logits.softmax(-1))[0].numpy()


def _hf_probs(folder: Path, image: Image.Image) -> np.ndarray:
    from transformers import pipeline

    out = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")(
        image, candidate_labels=LABELS, hypothesis_template=TEMPLATE
    )
    by_label = {r["label"]: r["score"] for r in out}
    return np.array([by_label[x] for x in LABELS])


def _sharpen(folder: Path, family: str) -> None:
    """Large logit scale so the image's content moves the probabilities far (random tiny towers agree a lot)."""
    import transformers

    cls = transformers.SiglipModel if family == "siglip" else transformers.CLIPModel
    model = cls.from_pretrained(folder)
    with torch.no_grad():
        model.logit_scale.fill_(4.6)  # exp = 100, CLIP's cap
    model.save_pretrained(folder)


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_probabilities_match_transformers_on_a_non_square_image(tmp_path: Path, family: str) -> None:
    folder = write_tiny_hf(tmp_path / family, family)
    _sharpen(folder, family)
    image = _wide_image()
    model = build_model(pretrained_model_config(folder))
    ours, theirs = _mmcl_probs(model, image, family == "siglip"), _hf_probs(folder, image)
    # torch's antialiased resize vs PIL's: at most a level per pixel (measured: 1e-8 here; the wrong geometry: 8e-4)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and the geometry matters on this image: the other mode gives a clearly different answer
    other = dict(model.preprocess_cfg(), resize_mode="shortest" if family == "siglip" else "squash")
    pipe = Pipeline(model, None, torch.device("cpu"))
    pipe.preprocess = transform_from_preprocess(other)
    wrong = _mmcl_probs_with(pipe, image, family == "siglip")
    assert np.abs(wrong - theirs).max() > 1e-4


def _mmcl_probs_with(pipe: Pipeline, image: Image.Image, siglip: bool) -> np.ndarray:
    img = pipe.encode_images([image])
    txt = pipe.encode_texts([TEMPLATE.format(x) for x in LABELS])
    scale, bias = pipe.logit_scale_and_bias()
    logits = scale * img @ txt.T
    return (torch.sigmoid(logits + bias) if siglip else logits.softmax(-1))[0].numpy()


def test_siglip_preprocessing_is_recorded_in_the_config_and_exported(tmp_path: Path) -> None:
    from mmcl.models.hf_export import export_hf

    folder = write_tiny_hf(tmp_path / "siglip", "siglip")
    cfg = pretrained_model_config(folder)
    assert cfg.image.preprocess["resize_mode"] == "squash"  # a run's config.yaml keeps its source's geometry
    model = build_model(cfg)
    assert model.preprocess_cfg()["resize_mode"] == "squash"
    out = export_hf(model, tmp_path / "out")
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and not pre.get("do_center_crop", False)
    image = _wide_image()
    np.testing.assert_allclose(_hf_probs(out, image), _hf_probs(folder, image), atol=1e-6)


def test_squash_training_crop_spans_the_whole_image_at_full_scale() -> None:
    """Fine-tuning a squash model: a full-area crop is the whole image (the view it was trained on)."""
    import random

    t = ImageTransform(32, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), resize_mode="squash")
    assert t.crop_box(150, 100, random.Random(0)) == (0, 0, 100, 150)
    ev = ImageTransform(32, resize_mode="squash")
    assert tuple(ev(_wide_image()).shape) == (3, 32, 32)


def test_open_clip_preprocess_cfg_round_trips(tmp_path: Path) -> None:
    from mmcl.models.openclip_compat import export_open_clip, model_config_from_open_clip

    oc = {
        "model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                      "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                           "resize_mode": "squash"},
    }  # fmt: skip
    model = build_model(model_config_from_open_clip(oc))
    pre = model.preprocess_cfg()
    assert (pre["resize_mode"], pre["interpolation"], pre["mean"]) == ("squash", "bilinear", (0.5, 0.5, 0.5))
    export_open_clip(model, tmp_path / "oc")
    written = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert written["resize_mode"] == "squash" and written["interpolation"] == "bilinear"


def test_a_run_keeps_its_sources_preprocessing_through_export(tmp_path: Path) -> None:
    """A run fine-tuned from a SigLIP folder: mmcl's answer on a non-square image equals the pipeline's on its
    export, even once the source's processor file changed (the run's config.yaml recorded it)."""
    from mmcl.config import ExperimentConfig, save_yaml
    from mmcl.engine.checkpoint import save_model
    from mmcl.export import export_hf_run
    from mmcl.inference import load_pipeline

    src = write_tiny_hf(tmp_path / "src", "siglip")
    cfg = ExperimentConfig(model=pretrained_model_config(src))
    model = build_model(cfg.model)
    with torch.no_grad():
        model.image.vision_model.post_layernorm.bias.add_(0.1)  # as if fine-tuned
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    save_model(model, run / "final" / "model.safetensors")
    # the source folder's processor changes to a cropping one: the run keeps what it was trained with
    crop = {"size": {"shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}
    (src / "preprocessor_config.json").write_text(json.dumps(crop))
    out = export_hf_run(run, tmp_path / "hf")
    image = _wide_image()
    pipe = load_pipeline(run, device="cpu")
    assert pipe.model.preprocess_cfg()["resize_mode"] == "squash"
    ours = _mmcl_probs_with(pipe, image, siglip=True)
    np.testing.assert_allclose(ours, _hf_probs(out, image), atol=1e-5)
