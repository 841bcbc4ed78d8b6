"""Joint model: CLIP + PrefixLM on one shared image tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import model_config
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.data.views import CaptionSplitView
from mmcl.models import build_model
from mmcl.models.clip import CLIP
from mmcl.models.joint import JointModel

CAPTIONS = [
    "a small red circle in the top left corner",
    "two large blue squares along the bottom",
    "a picture of three green stars near the bottom",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> JointModel:
    path = tmp_path_factory.mktemp("joint_tok") / "tokenizer.json"
    tok = train_tokenizer(CAPTIONS * 5, vocab_size=100, min_frequency=1)
    save_tokenizer(tok, path)
    torch.manual_seed(0)
    cfg = model_config({"preset": "joint-tiny", "text": {"tokenizer": str(path), "vocab_size": tok.get_vocab_size()}})
    return build_model(cfg)


def splits(model: JointModel, keys: list[str]) -> dict:
    """The caption splits the loader builds for the joint model's captioner."""
    return CaptionSplitView(model.lm.tokenizer, model.lm.dcfg, model.lm.split_seed)(CAPTIONS, keys, True)


def test_shared_tower_and_interfaces(model: JointModel) -> None:
    assert isinstance(model, CLIP) and isinstance(model, JointModel)
    assert model.lm.tokenizer is model.tokenizer
    images = torch.randn(3, 3, 32, 32)
    text, mask = model.tokenizer(CAPTIONS)
    model.eval()
    features, tokens = model.image_features_and_tokens(images)
    # the one-pass features are exactly what CLIP's encode_image computes
    torch.testing.assert_close(F.normalize(features, dim=-1), model.encode_image(images))
    assert tokens.shape == (3, 1 + 16, model.lm.d_model)  # class token + 4x4 patches
    out = model(images, text, mask, **splits(model, ["a", "b", "c"]))
    assert {"image_features", "text_features", "logit_scale", "logits", "labels", "prefix_len"} <= set(out)
    torch.testing.assert_close(out["text_features"], model.encode_text(text, mask))
    assert out["image_features"].shape == out["text_features"].shape == (3, 64)
    assert set(model(images, text, mask)) == {"image_features", "text_features", "logit_scale"}
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.preprocess_cfg()["image_size"] == 32


def test_caption_loss_trains_the_shared_tower(model: JointModel) -> None:
    model.train()
    model.zero_grad()
    out = model(torch.randn(3, 3, 32, 32), **splits(model, ["a", "b", "c"]))
    assert "text_features" not in out
    F.cross_entropy(out["logits"].flatten(0, 1), out["labels"].flatten()).backward()
    trunk_grads = [p.grad for p in model.image.trunk.parameters() if p.grad is not None]
    assert trunk_grads and sum(g.abs().sum() for g in trunk_grads) > 0
    assert model.text.token_embedding.weight.grad is None  # the text tower is not on the caption path
    model.zero_grad()


def test_caption_and_state_dict(model: JointModel, tmp_path: Path) -> None:
    images = torch.randn(2, 3, 32, 32)
    model.train()
    captions = model.caption(images, max_new_tokens=5)
    assert len(captions) == 2 and model.training
    assert model.caption(images, max_new_tokens=5, use_cache=False) == captions
    assert all(c.startswith("two") for c in model.caption(images, prefix="two", max_new_tokens=3))
    from mmcl.engine.checkpoint import load_model_weights, save_model

    state = model.state_dict()
    save_model(model, tmp_path / "model.safetensors")  # the trainer's checkpoint format
    assert any(k.startswith("image.trunk.") for k in state) and any(k.startswith("lm.seq2seq.") for k in state)
    assert not any(k.startswith("lm.image_stem.trunk") for k in state), "the tower is stored once"
    torch.manual_seed(1)
    other = build_model(model.cfg)
    load_model_weights(other, tmp_path / "model.safetensors")
    other.eval()
    model.eval()
    torch.testing.assert_close(other.encode_image(images), model.encode_image(images))
    assert other.caption(images, max_new_tokens=5) == model.caption(images, max_new_tokens=5)
