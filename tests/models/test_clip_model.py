from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmcl.config import MODEL_PRESET_DIR, model_config
from mmcl.models import build_model
from mmcl.models.clip import CLIP
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PRESETS = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml") if model_config(p.stem).arch == "clip")
SMALL = {"clip-tiny", "siglip-tiny", "clip-tiny-64", "clip-demo"}  # built in tests (big ones: config only)
CAPTIONS = ["a red circle", "two small blue squares on a gray background at the top of the picture", "a star"]


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    torch.manual_seed(0)
    return build_model(model_config("clip-tiny")).eval()


def test_expected_presets_exist() -> None:
    assert {"clip-tiny", "clip-tiny-64", "clip-demo", "vit-b-32", "vit-b-16", "siglip-tiny", "lit-minilm-tiny"} <= set(
        CLIP_PRESETS
    )


@pytest.mark.parametrize("name", CLIP_PRESETS)
def test_preset(name: str) -> None:
    import timm

    cfg = model_config(name)
    assert timm.is_model(cfg.image.timm_name)
    if name not in SMALL:
        return
    model = build_model(cfg)
    size = model.preprocess_cfg()["image_size"]
    ids, mask = model.tokenizer(CAPTIONS)
    out = model(torch.randn(3, 3, size, size), ids, mask)
    assert out["image_features"].shape == out["text_features"].shape == (3, cfg.embed_dim)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert float(out["logit_scale"].detach()) == pytest.approx(cfg.init_logit_scale, rel=1e-5)
    assert ("logit_bias" in out) == (cfg.init_logit_bias is not None)
    assert model.preprocess_cfg()["mean"] == pytest.approx(OPENAI_MEAN)  # CLIP ViTs use OpenAI's statistics


def test_clip_tiny_64_has_the_open_clip_benchmark_size() -> None:
    model = build_model(model_config("clip-tiny-64"))
    assert sum(p.numel() for p in model.parameters()) == 8_992_385  # open_clip's open_clip-tiny-64.json
    trunk = model.image.trunk
    assert (trunk.patch_embed.img_size, trunk.patch_embed.patch_size, trunk.embed_dim) == ((64, 64), (8, 8), 192)
    assert len(trunk.blocks) == 4 and trunk.blocks[0].attn.num_heads == 3


def test_vit_attention_is_fused(tiny: CLIP) -> None:
    attns = [m for m in tiny.image.trunk.modules() if hasattr(m, "fused_attn")]
    assert attns and all(m.fused_attn for m in attns)


def test_logit_scale_is_clamped_in_forward(tiny: CLIP) -> None:
    ids, mask = tiny.tokenizer(CAPTIONS[:1])
    with torch.no_grad():
        tiny.logit_scale.fill_(math.log(1000.0))
        out = tiny(torch.randn(1, 3, 32, 32), ids, mask)
        tiny.logit_scale.fill_(math.log(1 / 0.07))
    assert float(out["logit_scale"]) == pytest.approx(100.0)


def test_text_features_do_not_depend_on_batch_mates_or_padding(tiny: CLIP) -> None:
    """Each batch is cut to its longest caption; the features must be those of the full-length rows."""
    ids, mask = tiny.tokenizer(CAPTIONS)
    with torch.no_grad():
        together = tiny.encode_text(ids, mask)
        alone = torch.cat([tiny.encode_text(ids[i : i + 1], mask[i : i + 1]) for i in range(3)])
        no_mask = tiny.encode_text(ids)  # EOS found from the ids
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(together, no_mask, atol=1e-6, rtol=1e-5)


def test_mean_pooling_and_invalid_pooling() -> None:
    cfg = model_config({"preset": "clip-tiny", "text": {"pooling": "mean"}})
    model = build_model(cfg).eval()
    ids, mask = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        together = model.encode_text(ids, mask)
        alone = torch.cat([model.encode_text(ids[i : i + 1], mask[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="causal"):
        build_model(model_config({"preset": "clip-tiny", "text": {"pooling": "cls"}}))


def test_vocab_mismatch_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="vocab"):
        build_model(model_config({"preset": "clip-tiny", "text": {"vocab_size": 1000}}))


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(model_config("clip-tiny"))
    ids, mask = model.tokenizer(CAPTIONS)
    images = torch.randn(3, 3, 32, 32)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(images, ids, mask)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.text.transformer.grad_checkpointing and model.image.trunk.grad_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


def test_cnn_tower_and_imagenet_statistics() -> None:
    cfg = model_config("clip-tiny")
    cfg.image.timm_name, cfg.image.timm_kwargs = "resnet18", {}  # a CNN takes no img_size: built without it
    model = build_model(cfg)
    assert model.preprocess_cfg()["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_pretrained_clip_head_becomes_the_projection(tmp_path: Path) -> None:
    """timm CLIP towers ship their projection as the classifier: it must not be thrown away."""
    import timm

    kwargs = {"patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2, "img_size": 32}
    source = timm.create_model("vit_base_patch32_clip_224", num_classes=48, **kwargs)
    nn.init.normal_(source.head.weight)
    nn.init.zeros_(source.head.bias)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    cfg = model_config(
        {
            "preset": "clip-tiny",
            "embed_dim": 48,
            "image": {
                "pretrained": True,
                "timm_kwargs": {
                    **kwargs,
                    "pretrained_cfg_overlay": {"file": str(tmp_path / "weights.pth"), "num_classes": 48},
                },
            },
        }
    )
    model = build_model(cfg).eval()
    torch.testing.assert_close(model.image.proj.weight, source.head.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x, normalize=False), source.eval()(x))


def test_shortcuts_equal_the_plain_computation() -> None:
    """The image tower runs its last block for the class token only and the text tower for the EOS
    positions only, on batches cut to the longest caption: compare with full timm / full-length passes."""
    torch.manual_seed(0)
    model = build_model(model_config("clip-tiny")).double()  # float64: only the algebra may differ
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ids, mask = model.tokenizer(CAPTIONS)
    tower = model.text
    assert model.image.class_token_shortcut

    def plain_text() -> torch.Tensor:  # every block on all 32 positions, then pick the EOS
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks:
            x = block(x)
        return tower.ln_final(x[torch.arange(3), mask.sum(1) - 1]) @ tower.text_projection

    for fast, plain, params in (
        (lambda: model.image(images), lambda: model.image.proj(model.image.trunk(images)), model.image.parameters()),
        (lambda: tower(ids, mask), plain_text, tower.parameters()),
    ):
        params = list(params)
        a, b = fast(), plain()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
        ga = torch.autograd.grad(a.square().sum(), params)
        gb = torch.autograd.grad(b.square().sum(), params)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9)
