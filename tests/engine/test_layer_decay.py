"""Layer-wise lr decay: per-block factors in both towers, applied by set_lr through the optimizer groups."""

from __future__ import annotations

import pytest
import torch

from mmcl.config import TrainConfig, model_config
from mmcl.engine.layer_decay import layer_lr_scales
from mmcl.engine.optim import build_optimizer, set_lr
from mmcl.models import build_model


def test_scales_follow_depth_in_each_tower() -> None:
    model = build_model(model_config("clip-tiny"))  # 2 ViT blocks, 2 text blocks
    s = layer_lr_scales(model, 0.5)
    assert s["image.trunk.pos_embed"] == s["image.trunk.patch_embed.proj.weight"] == pytest.approx(0.125)
    assert s["image.trunk.blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert s["image.trunk.blocks.1.mlp.fc2.bias"] == pytest.approx(0.5)
    assert s["image.trunk.norm.weight"] == s["image.proj.weight"] == pytest.approx(1.0)
    assert s["text.token_embedding.weight"] == pytest.approx(0.125)
    assert s["text.transformer.resblocks.0.ln_1.weight"] == pytest.approx(0.25)
    assert s["text.text_projection"] == s["text.ln_final.weight"] == pytest.approx(1.0)
    assert "logit_scale" not in s
    assert layer_lr_scales(model, 1.0) == {}


def test_optimizer_groups_carry_the_scale_and_set_lr_applies_it() -> None:
    model = build_model(model_config("clip-tiny"))
    opt = build_optimizer(model, TrainConfig(layer_decay=0.5, lr=1e-3))
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_params
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.image.trunk.pos_embed)] == pytest.approx(1.25e-4)
    assert lr_of[id(model.text.transformer.resblocks[1].mlp.c_fc.weight)] == pytest.approx(5e-4)
    assert lr_of[id(model.logit_scale)] == pytest.approx(1e-3)
    plain = build_optimizer(model, TrainConfig(lr=1e-3))  # default: no decay, lr everywhere
    set_lr(plain, 1e-3)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    decays = {g["weight_decay"] for g in opt.param_groups if any(p is model.image.proj.weight for p in g["params"])}
    assert decays == {0.1}
    assert torch.is_tensor(model.logit_scale)
