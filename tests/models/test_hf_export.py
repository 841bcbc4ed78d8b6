"""`mmcl export hf`: a transformers folder the zero-shot pipeline runs offline, with mmcl's own answer,
and model cards (Hub front matter) for every export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import write_tiny_hf
from PIL import Image

from mmcl.cli import main
from mmcl.config import ExperimentConfig, model_config, save_yaml
from mmcl.engine.checkpoint import save_model
from mmcl.inference import load_pipeline
from mmcl.models import build_model
from mmcl.models.pretrained import pretrained_model_config

LABELS = ["red circle", "blue square", "green star", "seven"]
TEMPLATE = "This is a photo of {}."


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path: Path, cfg: ExperimentConfig, model: torch.nn.Module) -> Path:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    save_model(model, run / "final" / "model.safetensors")
    rows = [{"step": 10, "loss": 1.0}, {"step": 10, "eval_zeroshot_top1": 0.625, "eval_i2t_recall@1": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _mmcl_scores(run: Path, image: Image.Image) -> list[float]:
    """mmcl's zero-shot answer: softmax (CLIP) or sigmoid (SigLIP) of the scaled (+ biased) cosines."""
    pipe = load_pipeline(run, device="cpu")
    img = pipe.encode_images([image])
    txt = pipe.encode_texts([TEMPLATE.format(x) for x in LABELS])
    scale, bias = pipe.model.scale_and_bias()
    logits = float(scale.detach()) * img @ txt.T
    if bias is not None and pipe.model.image.__class__.__name__ == "HFVisionTower":
        return torch.sigmoid(logits + float(bias.detach()))[0].tolist()
    return logits.softmax(-1)[0].tolist()


def _pipeline_scores(out: Path, image: Image.Image) -> list[float]:
    from transformers import pipeline

    result = pipeline("zero-shot-image-classification", model=str(out), device="cpu")(
        image, candidate_labels=LABELS, hypothesis_template=TEMPLATE
    )
    by_label = {r["label"]: r["score"] for r in result}
    return [by_label[x] for x in LABELS]


def _check_same_answer(run: Path, out: Path) -> None:
    for seed in range(3):
        image = _image(seed)
        ours, theirs = _mmcl_scores(run, image), _pipeline_scores(out, image)
        assert int(np.argmax(ours)) == int(np.argmax(theirs))
        np.testing.assert_allclose(theirs, ours, atol=1e-5)


def _check_card(out: Path, library: str) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == library
    assert "mmcl" in card.data.tags and card.data.license and card.data.datasets == ["train"]
    assert "accuracy" in card.data.metrics and "recall" in card.data.metrics
    assert "| zeroshot_top1 | 0.6250 |" in card.text and "## Training config" in card.text


def test_native_clip_exports_to_a_working_transformers_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=model_config("clip-tiny"))
    cfg.data.train_shards = [str(tmp_path / "data" / "train")]
    model = build_model(cfg.model)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # e^5 = 148 is clamped at 100: the export must clamp too
    run = _run(tmp_path, cfg, model)
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["model_type"] == "clip"
    _check_same_answer(run, tmp_path / "hf")
    _check_card(tmp_path / "hf", "transformers")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_imported_transformers_model_exports_back(tmp_path: Path, family: str) -> None:
    src = write_tiny_hf(tmp_path / "src", family)
    cfg = ExperimentConfig(model=pretrained_model_config(src))
    cfg.data.train_shards = [str(tmp_path / "data" / "train")]
    model = build_model(cfg.model)
    with torch.no_grad():  # as if fine-tuned: the export must carry mmcl's weights, not the source's
        model.image.vision_model.post_layernorm.bias.add_(0.1)
    run = _run(tmp_path, cfg, model)
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    _check_same_answer(run, tmp_path / "hf")
    _check_card(tmp_path / "hf", "transformers")


def test_parts_without_a_transformers_equivalent_are_named(tmp_path: Path, capsys) -> None:
    cfg = ExperimentConfig(model=model_config("clip-tiny-cnn-64"))
    run = _run(tmp_path, cfg, build_model(cfg.model))
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no transformers CLIPModel equivalent" in err and "image tower" in err


def test_open_clip_export_writes_a_model_card(tmp_path: Path) -> None:
    cfg = ExperimentConfig(model=model_config("clip-tiny"))
    cfg.data.train_shards = [str(tmp_path / "data" / "train")]
    run = _run(tmp_path, cfg, build_model(cfg.model))
    assert main(["export", "open_clip", str(run), str(tmp_path / "oc")]) == 0
    _check_card(tmp_path / "oc", "open_clip")
