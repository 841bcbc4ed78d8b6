"""`model.image.pool=attention`: CLIP's attention pool (timm's AttentionPool2d) on a CNN tower keeps "where"."""

from __future__ import annotations

import pytest
import torch

from mmcl.config import model_config
from mmcl.engine.checkpoint import load_model_weights, save_model
from mmcl.models import build_model
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def narrow_cnn(pool: str):
    cfg = model_config("clip-tiny-cnn-narrow-64")
    cfg.image.pool = pool
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_attention_pool_sees_where_average_pooling_does_not():
    """Two feature maps holding the same activations at swapped places pool to one vector under global average
    pooling, and to two under the attention pool (its 2-D position embedding), with gradients reaching it."""
    model = narrow_cnn("attention")
    tower = model.image
    fmap = torch.randn(1, tower.trunk.num_features, 2, 2)
    swapped = fmap.flip(-1)  # left and right columns exchanged
    assert torch.allclose(fmap.mean((2, 3)), swapped.mean((2, 3)))
    a, b = tower.attn_pool(fmap), tower.attn_pool(swapped)
    assert a.shape == (1, tower.trunk.num_features) and (a - b).abs().max() > 1e-3
    out = model.encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 128)
    out.sum().backward()
    assert tower.attn_pool.pos_embed.grad is not None and tower.attn_pool.pos_embed.grad.abs().sum() > 0


def test_attention_pool_weights_round_trip(tmp_path):
    model = narrow_cnn("attention")
    save_model(model, tmp_path / "model.safetensors")
    again = narrow_cnn("attention")
    torch.nn.init.zeros_(again.image.attn_pool.pos_embed)
    load_model_weights(again, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again.encode_image(x), model.encode_image(x))


def test_attention_pool_refuses_what_it_cannot_pool():
    vit = model_config("clip-tiny-64")
    vit.image.pool = "attention"
    with pytest.raises(UserError, match="needs a CNN"):
        build_model(vit)
    cnn = model_config("clip-tiny-cnn-narrow-64")
    cnn.image.pool, cnn.image.pool_heads = "attention", 7
    with pytest.raises(UserError, match="does not divide the trunk's width 304"):
        build_model(cnn)
