"""`model.init_from`: transformers CLIP/SigLIP folders and open_clip files/folders load into mmcl exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import write_tiny_hf

from mmcl.config import load_experiment
from mmcl.models import build_model
from mmcl.models.openclip_compat import model_config_from_open_clip
from mmcl.models.pretrained import pretrained_model_config, resolve_source
from mmcl.utils import UserError

TINY_OC = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXTS = ["a photo of a cat", "seven", "two small blue squares on a gray background!"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_folder(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, write_tiny_hf(tmp_path_factory.mktemp(f"hf_{request.param}"), request.param)


def test_transformers_folder_imports_with_equal_embeddings(hf_folder) -> None:
    import transformers

    family, path = hf_folder
    cfg = pretrained_model_config(path)
    assert cfg.image.kind == cfg.text.kind == "hf_clip" and cfg.init_from == str(path.resolve())
    model = build_model(cfg).eval()
    hf = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # the text rows transformers' zero-shot pipeline builds for this family
    pad = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"padding": True}
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    ids, mask = model.tokenizer(TEXTS)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=images).pooler_output
        ref_txt = hf.get_text_features(**tok(TEXTS, return_tensors="pt", **pad)).pooler_output
        torch.testing.assert_close(model.encode_image(images, normalize=False), ref_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, mask, normalize=False), ref_txt, atol=1e-5, rtol=0)
    assert float(model.logit_scale.detach()) == pytest.approx(float(hf.logit_scale.detach().reshape(())))
    if family == "siglip":
        assert float(model.logit_bias.detach()) == pytest.approx(float(hf.logit_bias.detach().reshape(())))


def test_hf_towers_lock_and_train(hf_folder, demo_shards: Path, tmp_path: Path) -> None:
    from mmcl.engine.trainer import train

    _, path = hf_folder
    cfg = load_experiment(
        None,
        [f"model.init_from={path}", f"data.train_shards=[{demo_shards / 'train'}]", "data.batch_size=8",
         "data.num_workers=0", "train.steps=2", "train.warmup_steps=1", "train.trackers=[none]",
         "train.progress=false", f"train.output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    arch = pretrained_model_config(path)
    arch.image.lock, arch.image.unlocked_layers = True, 1
    cfg.model = arch
    model = build_model(cfg.model)
    frozen = {n for n, p in model.image.named_parameters() if not p.requires_grad}
    assert any("layers.0." in n for n in frozen) and not any("layers.1." in n for n in frozen)
    result = train(cfg)
    assert result.step == 2 and (result.final_dir / "model.safetensors").is_file()


def _open_clip_model():
    from open_clip.model import CLIP as OpenClipCLIP

    torch.manual_seed(0)
    return OpenClipCLIP(**TINY_OC).eval()


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_hub_folder_imports(tmp_path: Path, weights: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    oc = _open_clip_model()
    state = {k: v.contiguous() for k, v in oc.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(tmp_path / weights))
    else:
        torch.save(state, tmp_path / weights)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OC, "preprocess_cfg": {}}))
    assert resolve_source(tmp_path).kind == "open_clip"
    model = build_model(pretrained_model_config(tmp_path)).eval()
    images = torch.randn(2, 3, 32, 32)
    ids, _ = model.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), oc.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        ref = oc.encode_text(open_clip.tokenize(TEXTS, context_length=16), normalize=True)
        torch.testing.assert_close(model.encode_text(ids), ref, atol=1e-5, rtol=0)


def test_open_clip_file_needs_an_architecture_and_a_mismatch_names_the_tensor(tmp_path: Path) -> None:
    file = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _open_clip_model().state_dict().items()}}, file)
    with pytest.raises(UserError, match="does not say its architecture"):
        pretrained_model_config(file)
    cfg = model_config_from_open_clip(TINY_OC)
    cfg.init_from = str(file)
    build_model(cfg)  # the right architecture loads
    wider = json.loads(json.dumps(TINY_OC))
    wider["vision_cfg"]["width"] = 32  # a different image tower width
    cfg = model_config_from_open_clip(wider)
    cfg.init_from = str(file)
    with pytest.raises(UserError, match=r"tensor 'image\.[\w.]+' has shape \(\d+(, \d+)*\) in the checkpoint but"):
        build_model(cfg)


def test_init_from_is_a_typed_config_key_and_a_missing_path_is_one_line(tmp_path: Path) -> None:
    cfg = load_experiment(None, [f"model.init_from={tmp_path / 'nope'}", "model.preset=clip-tiny"])
    assert cfg.model.init_from.endswith("nope")
    with pytest.raises(UserError, match="no such file or folder"):
        build_model(cfg.model)
