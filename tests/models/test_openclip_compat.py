"""open_clip <-> mmcl: configs, checkpoints in both directions, numerically equal encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcl.config import ExperimentConfig, model_config, save_yaml
from mmcl.models import build_model
from mmcl.models.clip import CLIP
from mmcl.models.openclip_compat import (
    export_open_clip,
    load_open_clip_state_dict,
    model_config_from_open_clip,
    open_clip_to_mmcl,
)
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_OC = {  # smaller than the benchmark model, same kind; image 32 px
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red circle", "two small blue squares on a gray background", "x", "three green stars!! at the top"]


def _oc_config() -> dict:
    """open_clip's config of the benchmark architecture (clip-tiny-64), derived through the exporter as
    bench/common.py does: no file from outside the repository."""
    from mmcl.config import model_config
    from mmcl.models import build_model
    from mmcl.models.openclip_compat import open_clip_model_config

    return open_clip_model_config(build_model(model_config("clip-tiny-64")))


def _assert_same_encoders(oc_model, model: CLIP, image_size: int) -> None:
    import open_clip

    torch.manual_seed(1)
    images = torch.randn(3, 3, image_size, image_size)
    ctx = model.cfg.text.context_length
    oc_text = open_clip.tokenize(CAPTIONS, context_length=ctx)
    ids, mask = model.tokenizer(CAPTIONS)
    assert torch.equal(ids, oc_text)
    oc_model.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), oc_model.encode_image(images, normalize=True), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            model.encode_text(ids, mask), oc_model.encode_text(oc_text, normalize=True), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(model.logit_scale.exp(), oc_model.logit_scale.exp().reshape(()))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip_checkpoint_loads_into_mmcl(tmp_path: Path, fmt: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    cfg_json = _oc_config()
    torch.manual_seed(0)
    oc_model = open_clip.model.CLIP(**cfg_json)
    with torch.no_grad():  # move the temperature off its init so loading it is checked
        oc_model.logit_scale.fill_(3.0)
    path = tmp_path / f"oc.{fmt}"
    if fmt == "pt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in oc_model.state_dict().items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(path))
    cfg = model_config_from_open_clip(cfg_json)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in oc_model.parameters())
    load_open_clip_state_dict(model, path)
    _assert_same_encoders(oc_model, model, cfg.image.image_size)


def test_custom_text_layout_loads() -> None:
    import open_clip

    torch.manual_seed(0)
    oc_model = open_clip.model.CustomTextCLIP(**TINY_OC)  # text tower under `text.`
    model = build_model(model_config_from_open_clip(TINY_OC))
    load_open_clip_state_dict(model, oc_model.state_dict())
    _assert_same_encoders(oc_model, model, 32)


@pytest.mark.parametrize("preset", ["clip-tiny", "siglip-tiny"])
def test_mmcl_exports_to_open_clip(tmp_path: Path, preset: str) -> None:
    import open_clip

    torch.manual_seed(0)
    model = build_model(model_config(preset))
    with torch.no_grad():
        for p in model.parameters():  # leave the init: non-trivial norms and biases
            p.add_(0.02 * torch.randn_like(p))
    config_path, weights_path = export_open_clip(model, tmp_path / "export", name=f"mmcl-test-{preset}")
    assert config_path.name == f"mmcl-test-{preset}.json" and weights_path.name == "open_clip_model.safetensors"

    from_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    _assert_same_encoders(from_dir, model, 32)
    assert preprocess.transforms[-1].mean == list(model.preprocess_cfg()["mean"])
    if preset == "siglip-tiny":
        torch.testing.assert_close(from_dir.logit_bias.reshape(()), model.logit_bias)

    open_clip.add_model_config(config_path)
    named = open_clip.create_model(config_path.stem, pretrained=str(weights_path))
    _assert_same_encoders(named, model, 32)

    back = build_model(model_config_from_open_clip(config_path))  # and round trip into mmcl again
    load_open_clip_state_dict(back, weights_path)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_cli_export_of_a_run_folder(tmp_path: Path) -> None:
    import open_clip

    from mmcl.cli import main
    from mmcl.engine.checkpoint import save_model

    torch.manual_seed(0)
    cfg = ExperimentConfig(model=model_config("clip-tiny"))
    model = build_model(cfg.model)
    run = tmp_path / "runs" / "demo"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    save_model(model, run / "final" / "model.safetensors")
    assert main(["export", "open_clip", str(run), str(tmp_path / "oc")]) == 0
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    _assert_same_encoders(exported, model, 32)


def test_config_mapping_of_a_builtin_open_clip_model() -> None:
    import open_clip

    cfg = model_config_from_open_clip(open_clip.get_model_config("ViT-B-16"))
    assert cfg.embed_dim == 512 and cfg.image.image_size == 224
    assert cfg.image.timm_kwargs == {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length) == (512, 12, 8, 77)


def test_unsupported_models_are_refused(tmp_path: Path) -> None:
    import open_clip

    with pytest.raises(UserError, match="quick_gelu"):
        model_config_from_open_clip({**TINY_OC, "quick_gelu": True})
    with pytest.raises(UserError, match="hf_model_name"):
        model_config_from_open_clip(
            {**TINY_OC, "text_cfg": {"hf_model_name": "roberta-base", "hf_tokenizer_name": "x"}}
        )
    with pytest.raises(UserError, match="ModifiedResNet"):
        model_config_from_open_clip(open_clip.get_model_config("RN50"))
    with pytest.raises(UserError, match="ls_init_value"):
        model_config_from_open_clip({**TINY_OC, "vision_cfg": {**TINY_OC["vision_cfg"], "ls_init_value": 1e-5}})
    lit = model_config("lit-minilm-tiny")
    lit.text.lock = False
    with pytest.raises(UserError, match="text tower"):
        export_open_clip(build_model(lit), tmp_path / "x")


def test_mismatched_checkpoint_is_a_clear_error() -> None:
    import open_clip

    oc_model = open_clip.model.CLIP(**TINY_OC)
    other = {**TINY_OC, "text_cfg": {**TINY_OC["text_cfg"], "layers": 1}}
    model = build_model(model_config_from_open_clip(other))
    with pytest.raises(UserError, match="unexpected: text.transformer.resblocks.1"):
        load_open_clip_state_dict(model, oc_model.state_dict())


def _init_spread(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, int]]:
    return {
        k: (v.float().mean().item(), v.float().std().item(), v.numel()) for k, v in state_dict.items() if v.numel() > 1
    }


def test_from_scratch_vit_starts_like_open_clip() -> None:
    """The image tower's default init draws every tensor from open_clip's distribution (spread within 15%, means
    within 5 standard errors); timm's own init (`image.init=timm`) starts the class token and projections far smaller."""
    import open_clip

    cfg_json = _oc_config()
    torch.manual_seed(0)
    reference = _init_spread(open_clip_to_mmcl(open_clip.model.CLIP(**cfg_json).state_dict()))
    cfg = model_config_from_open_clip(cfg_json)
    ours = _init_spread(build_model(cfg).state_dict())
    assert set(ours) == set(reference)
    for key, (mean, std, n) in reference.items():
        assert ours[key][1] == pytest.approx(std, rel=0.15, abs=1e-6), key
        assert abs(ours[key][0] - mean) <= 5 * std / n**0.5 + 1e-6, key

    cfg.image.init = "timm"
    timm_init = _init_spread(build_model(cfg).state_dict())
    assert timm_init["image.trunk.cls_token"][1] < 0.1 * reference["image.trunk.cls_token"][1]
    assert (
        timm_init["image.trunk.blocks.0.attn.qkv.weight"][1]
        < 0.6 * reference["image.trunk.blocks.0.attn.qkv.weight"][1]
    )
