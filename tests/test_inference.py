"""Loading trained models: run folders, checkpoint folders, and clear errors for what is not mmcl's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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


def test_encoder_protocol_flags_and_the_models_own_logit_scale_limit():
    """`Pipeline` reports what the model can do and its temperature within the model's own maximum (not 100)."""
    from mmcl.inference import Pipeline

    cfg = load_experiment(None, ["model.preset=clip-tiny", "model.max_logit_scale=200"])
    model = build_model(cfg.model).eval()
    pipe = Pipeline.from_model(model)
    assert pipe.can_encode and not pipe.can_caption
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    scale, bias = pipe.logit_scale_and_bias()
    assert math.isclose(scale, 150.0, rel_tol=1e-5) and bias is None
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert math.isclose(pipe.logit_scale_and_bias()[0], 200.0, rel_tol=1e-5)


def test_pipeline_reads_what_a_model_declares_it_can_do():
    """`Pipeline` takes `can_encode` / `can_caption` from the model (a class attribute), not from its type."""
    from mmcl.inference import Pipeline
    from mmcl.models.clip import CLIP
    from mmcl.models.joint import JointModel
    from mmcl.models.prefix_lm import PrefixLM

    assert (CLIP.can_encode, CLIP.can_caption) == (True, False)
    assert (JointModel.can_encode, JointModel.can_caption) == (True, True)
    assert (PrefixLM.can_encode, PrefixLM.can_caption) == (False, True)
    clip = build_model(load_experiment(None, ["model.preset=clip-tiny"]).model).eval()

    class CaptionOnly(torch.nn.Module):  # no mmcl model class: only its declaration says what it does
        can_encode, can_caption = False, True

        def __init__(self) -> None:
            super().__init__()
            self.inner, self.tokenizer = clip, clip.tokenizer

        def preprocess_cfg(self):
            return clip.preprocess_cfg()

    pipe = Pipeline.from_model(CaptionOnly())
    assert not pipe.can_encode and pipe.can_caption
    with pytest.raises(UserError, match="no image/text encoder"):
        pipe.encode_texts(["a red circle"])


def test_app_probabilities_equal_eval_zero_shot(tmp_path):
    """The app's zero-shot answer is eval's classifier scored with the model's own scale, uncapped at 100."""
    from mmcl.app import handlers as H
    from mmcl.eval.templates import format_prompts
    from mmcl.inference import Pipeline

    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", "model.max_logit_scale=200"])
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    pipe = Pipeline.from_model(model)
    state = H.AppState()
    state.set_pipeline(pipe, "tiny")
    image, labels = Image.new("RGB", (40, 30), "red"), ["red circle", "blue square", "green triangle"]
    templates = H.resolve_templates("short")
    app = dict(H.classify(state, image, ", ".join(labels), "short", top_k=3))
    # plain reference: mean of normalised prompt embeddings per class, cosine, x150, softmax
    img = pipe.encode_images([image])[0]
    classes = torch.stack(
        [F.normalize(pipe.encode_texts(format_prompts(c, templates)), dim=-1).mean(0) for c in labels]
    )
    cos = F.normalize(classes, dim=-1) @ img
    expected = (150.0 * cos).softmax(0)
    for label, p in zip(labels, expected.tolist()):
        assert math.isclose(app[label], p, rel_tol=1e-4, abs_tol=1e-6)


# ---- transformers and open_clip folders load like runs (issue 19: "evaluate and serve any model mmcl can load")


def _tiny_hf(tmp_path, family="clip"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "models"))
    from hf_helpers import write_tiny_hf

    return write_tiny_hf(tmp_path / family, family)


def test_transformers_folder_loads_as_a_pipeline(tmp_path):
    import transformers

    folder = _tiny_hf(tmp_path)
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.can_encode and pipe.config.model.image.kind == "hf_clip"
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(pipe.encode_images(pixels), expected, atol=1e-5, rtol=1e-4)


def test_open_clip_folder_loads_as_a_pipeline(tmp_path, run):
    from mmcl.models.openclip_compat import export_open_clip

    _, model = run
    export_open_clip(model.eval(), tmp_path / "oc")
    pipe = load_pipeline(tmp_path / "oc", device="cpu")
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.encode_images(pixels), model.encode_image(pixels), atol=1e-5, rtol=1e-4)


def test_eval_and_app_take_a_transformers_folder(tmp_path, demo_shards, capsys):
    from mmcl.app.models import load_run
    from mmcl.cli import main

    folder = _tiny_hf(tmp_path)
    capsys.readouterr()
    rc = main(["eval", "zeroshot", str(folder), "--shards", str(demo_shards / "val"), "--quiet",
               "--out", str(tmp_path / "report")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "report" / "eval.md").is_file()
    assert load_run(folder).can_encode


def test_a_hub_name_without_prefix_gets_the_hint(tmp_path, monkeypatch):
    from mmcl.models.pretrained import resolve_source

    monkeypatch.chdir(tmp_path)
    for fn in (load_pipeline, resolve_source):
        with pytest.raises(UserError) as e:
            fn("openai/clip-vit-base-patch32")
        assert "hf:openai/clip-vit-base-patch32" in str(e.value) and "\n" not in str(e.value)
