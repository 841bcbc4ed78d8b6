"""Loading trained models: run folders, checkpoint folders, and clear errors for what is not mmcl's."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmcl.config import load_experiment, save_yaml
from mmcl.engine.checkpoint import save_model
from mmcl.inference import load_pipeline
from mmcl.models import build_model
from mmcl.utils import UserError


@pytest.fixture
def run(tmp_path):
    cfg = load_experiment(None, ["model.preset=clip-tiny"])
    folder = tmp_path / "run"
    (folder / "checkpoints" / "step_0000010").mkdir(parents=True)
    save_yaml(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_model(model, folder / "checkpoints" / "step_0000010" / "model.safetensors")
    (folder / "checkpoints" / "step_0000010" / "trainer.json").write_text('{"step": 10}')
    return folder, model


def test_run_and_checkpoint_folders_load_the_same_model(run):
    folder, model = run
    for path in (folder, folder / "checkpoints" / "step_0000010"):
        pipe = load_pipeline(path)
        assert pipe.can_encode and not pipe.can_caption
        images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
        feats = pipe.encode_images(images)
        assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
        ids, mask = model.tokenizer(["a red circle"])
        with torch.no_grad():
            ref = model.eval().encode_text(ids, mask, normalize=True)
        assert torch.allclose(pipe.encode_texts(["a red circle"]), ref, atol=1e-6)
    with pytest.raises(UserError, match="cannot caption"):
        pipe.caption(images)


def test_not_an_mmcl_checkpoint(tmp_path, run):
    with pytest.raises(UserError, match="no such run"):
        load_pipeline(tmp_path / "missing")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="give the run or checkpoint folder"):
        load_pipeline(tmp_path / "weights.pt")
    other = tmp_path / "open_clip_export"
    other.mkdir()
    (other / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not an mmcl run or checkpoint"):
        load_pipeline(other)
    folder, _ = run
    save_yaml(load_experiment(None, ["model.preset=clip-tiny", "model.embed_dim=32"]), folder / "config.yaml")
    with pytest.raises(UserError, match="weights do not match the model config"):
        load_pipeline(folder)
