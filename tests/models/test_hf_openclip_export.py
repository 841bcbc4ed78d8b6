"""`mmcl export open_clip` of runs without open_clip's native layout (issue 19.7): a run with towers from a
transformers CLIPModel (the README fine-tune guide's run) converts and gives open_clip the same embeddings;
a SigLIP-tower run and a joint run are refused in one whole line naming the part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import write_tiny_hf

from mmcl.cli import main
from mmcl.config import ExperimentConfig, model_config, save_yaml
from mmcl.engine.checkpoint import save_model
from mmcl.inference import load_pipeline
from mmcl.models import build_model
from mmcl.models.pretrained import pretrained_model_config

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a red circle", "two small blue squares on a gray background", "x"]


def _run(tmp_path: Path, cfg: ExperimentConfig, model: torch.nn.Module) -> Path:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    save_model(model, run / "final" / "model.safetensors")
    return run


def _hf_run(tmp_path: Path, family: str) -> Path:
    src = write_tiny_hf(tmp_path / "src", family)
    cfg = ExperimentConfig(model=pretrained_model_config(src))
    model = build_model(cfg.model)
    with torch.no_grad():  # as if fine-tuned: the export must carry the run's weights
        model.image.vision_model.post_layernorm.bias.add_(0.1)
        model.text.text_model.final_layer_norm.weight.mul_(1.1)
    return _run(tmp_path, cfg, model)


def test_transformers_clip_run_exports_to_open_clip_with_the_same_embeddings(tmp_path: Path) -> None:
    import open_clip

    run = _hf_run(tmp_path, "clip")
    out = tmp_path / "oc"
    assert main(["export", "open_clip", str(run), str(out)]) == 0
    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_model.eval()
    pipe = load_pipeline(run, device="cpu")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    ctx = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["context_length"]
    with torch.no_grad():
        torch.testing.assert_close(
            oc_model.encode_image(images, normalize=True), pipe.encode_images(images), atol=1e-5, rtol=1e-4
        )
        oc_text = oc_model.encode_text(open_clip.tokenize(CAPTIONS, context_length=ctx), normalize=True)
        torch.testing.assert_close(oc_text, pipe.encode_texts(CAPTIONS), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(oc_model.logit_scale.exp().reshape(()), pipe.model.logit_scale.exp())


def test_siglip_tower_run_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    run = _hf_run(tmp_path, "siglip")
    capsys.readouterr()  # transformers' progress bars while writing the source folder
    assert main(["export", "open_clip", str(run), str(tmp_path / "oc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no open_clip equivalent" in err and "SiglipModel" in err
    assert not (tmp_path / "oc" / "open_clip_model.safetensors").exists()


def test_joint_run_is_refused_in_one_whole_line(tmp_path: Path, capsys) -> None:
    cfg = ExperimentConfig(model=model_config("joint-tiny"))
    run = _run(tmp_path, cfg, build_model(cfg.model))
    assert main(["export", "open_clip", str(run), str(tmp_path / "oc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "captioning decoder" in err and err.endswith("equivalent")
