"""`CLIP.encode_image_tokens` / `encode_text_tokens`: per-token features in the pooled output's space."""

from __future__ import annotations

import pytest
import torch

from mmcl.config import model_config
from mmcl.models import build_model
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str, **image):
    cfg = model_config(preset)
    for k, v in image.items():
        setattr(cfg.image, k, v)
    torch.manual_seed(0)
    return build_model(cfg).eval()


@torch.no_grad()
def test_vit_patch_tokens_take_the_class_tokens_path() -> None:
    """The pooled output of a CLIP-layout ViT is its class token after the final norm and projection (computed
    by the class-token shortcut); the patch tokens come out of the same norm and projection, unit length."""
    model = _model("clip-tiny")  # 32 px, 8 px patches: 16 tokens
    tower, images = model.image, torch.randn(3, 3, 32, 32)
    assert tower.class_token_shortcut
    tokens = model.encode_image_tokens(images)
    assert tokens.shape == (3, 16, model.cfg.embed_dim)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 16))
    every = tower.proj(tower.trunk.forward_features(images))  # (B, 1 + 16, D): class token first
    torch.testing.assert_close(every[:, 0], model.encode_image(images, normalize=False), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(every[:, 1:], model.encode_image_tokens(images, normalize=False))


@torch.no_grad()
def test_cnn_tokens_average_to_the_pooled_output() -> None:
    """Global average pooling then a linear projection = the mean of the projected positions."""
    model = _model("clip-tiny-cnn-narrow-64")  # 64 px, stride 32: a 2x2 map
    images = torch.randn(2, 3, 64, 64)
    tokens = model.encode_image_tokens(images, normalize=False)
    assert tokens.shape == (2, 4, 128)
    torch.testing.assert_close(tokens.mean(1), model.encode_image(images, normalize=False), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_attention_pool_tokens_are_the_values_it_averages() -> None:
    """With the pool's queries zeroed its attention is uniform over the mean token and the h*w positions; with
    the mean token's position embedding set to the positions' mean its value is their values' mean (the value
    map is affine), so the pooled output is exactly the mean of the tokens. The tokens carry the 2-D position
    embedding: one feature vector at two places gives two tokens."""
    model = _model("clip-tiny-cnn-narrow-64", pool="attention")
    pool = model.image.attn_pool
    dim = pool.embed_dim
    pool.qkv.weight[:dim].zero_()
    pool.qkv.bias[:dim].zero_()
    pool.pos_embed[0] = pool.pos_embed[1:].mean(0)
    images = torch.randn(2, 3, 64, 64)
    tokens = model.encode_image_tokens(images, normalize=False)
    assert tokens.shape == (2, 4, 128)
    torch.testing.assert_close(tokens.mean(1), model.encode_image(images, normalize=False), atol=1e-5, rtol=1e-4)
    from mmcl.models.towers import _attention_pool_values

    same = torch.randn(1, pool.in_features, 1, 1).expand(1, -1, 2, 2)  # one feature at every place
    values = _attention_pool_values(pool, same)
    assert (values[0, 0] - values[0, 1]).abs().max() > 1e-3


@torch.no_grad()
def test_text_tokens_mask_and_eos_state() -> None:
    """CLIP's text tower: the EOS token's feature is the pooled output; the mask keeps the caption's tokens up to
    the EOS without the BOS (a causal tower's BOS state is the same for every caption); padding is zero; and a
    row's tokens do not depend on the longer rows batched with it."""
    model = _model("clip-tiny")
    captions = ["a red square", "a small blue circle left of a green star"]
    ids, mask = model.tokenizer(captions)
    tokens, keep = model.encode_text_tokens(ids, mask)
    assert tokens.shape == (2, ids.shape[1], model.cfg.embed_dim) and keep.dtype == torch.bool
    lengths = mask.sum(1)
    for i in range(2):
        expected = torch.zeros(ids.shape[1], dtype=torch.bool)
        expected[1 : lengths[i]] = True
        assert torch.equal(keep[i], expected)
        assert tokens[i, lengths[i] :].abs().max() == 0
    pooled = model.encode_text(ids, mask)
    torch.testing.assert_close(tokens[torch.arange(2), lengths - 1], pooled, atol=1e-5, rtol=1e-4)
    alone, _ = model.encode_text_tokens(ids[:1], mask[:1])
    torch.testing.assert_close(alone[0], tokens[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_hf_text_tower_tokens() -> None:
    """A Hugging Face encoder: every real token (its [CLS] included), projected; padding masked and zero."""
    model = _model("lit-minilm-tiny")
    ids, mask = model.tokenizer(["a red square", "a small blue circle left of a green star"])
    tokens, keep = model.encode_text_tokens(ids, mask)
    assert torch.equal(keep, mask.bool()) and tokens.shape == (*ids.shape, model.cfg.embed_dim)
    torch.testing.assert_close(tokens[keep].norm(dim=-1), torch.ones(int(keep.sum())))
    assert tokens[~keep].abs().max() == 0
    n = int(mask[0].sum())
    states = model.text.model(input_ids=ids[:1, :n], attention_mask=mask[:1, :n]).last_hidden_state
    torch.testing.assert_close(tokens[0, :n], torch.nn.functional.normalize(model.text.proj(states[0]), dim=-1))


def test_a_tower_without_tokens_is_a_one_line_error(tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_helpers import write_tiny_hf

    from mmcl.models.pretrained import pretrained_model_config

    model = build_model(pretrained_model_config(write_tiny_hf(tmp_path / "clip", "clip")))
    with pytest.raises(UserError, match=r"^the image tower HFVisionTower \(model.image.kind 'hf_clip'\) has no per"):
        model.encode_image_tokens(torch.randn(1, 3, 32, 32))
    ids, mask = model.tokenizer(["a red square"])
    with pytest.raises(UserError, match=r"text tower HFDualTextTower \(model.text.kind 'hf_clip'\)") as e:
        model.encode_text_tokens(ids, mask)
    assert "\n" not in str(e.value)
