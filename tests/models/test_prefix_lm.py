"""PrefixLM model: prefix/suffix split, teacher forcing, generation, bad inputs, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcl.config import model_config
from mmcl.data.text import build_tokenizer
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.data.views import IGNORE_INDEX, CaptionSplitView, pad_ids
from mmcl.models import build_model
from mmcl.models.prefix_lm import PrefixLM
from mmcl.utils import UserError

CAPTIONS = [
    "a small red circle in the top left corner",
    "two large blue squares along the bottom",
    "a picture of three green stars near the bottom",
    "a drawing of a yellow triangle in the middle",
    "there is one little purple cross on a gray background",
    "an image of a big white star at the top",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prefixlm_tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(CAPTIONS * 5, vocab_size=150, min_frequency=1), path)
    return path


def make_model(tok_path: Path, seed: int = 0, **decoder) -> PrefixLM:
    torch.manual_seed(seed)
    cfg = model_config({"preset": "prefixlm-tiny", "text": {"tokenizer": str(tok_path)}, "decoder": decoder})
    return build_model(cfg)


def split_view(model: PrefixLM) -> CaptionSplitView:
    """The loader's caption splitter for `model` (what the 'caption' loss term asks for)."""
    return CaptionSplitView(model.tokenizer, model.dcfg, model.split_seed)


def run(model: PrefixLM, images, captions: list[str], keys: list[str], has_images: bool = True) -> dict:
    """Teacher-forced forward on captions split as the loader splits them."""
    return model(images, **split_view(model)(captions, keys, has_images))


def test_split_reassembles_caption_and_respects_bounds(tok_path: Path) -> None:
    model = make_model(tok_path, min_prefix_frac=0.2, max_prefix_frac=0.6, empty_prefix_prob=0.3)
    tok = model.tokenizer
    empty = 0
    n_keys = 1500
    for i in range(n_keys):
        caption = CAPTIONS[i % len(CAPTIONS)]
        ids = tok.encode(caption)
        s = split_view(model).split_caption(caption, key=f"{i:09d}")
        assert s.prefix + s.target[:-1] == ids and s.target[-1] == tok.eos_id
        k = len(s.prefix)
        assert k <= min(int(0.6 * len(ids)), len(ids) - 1)
        if k == 0:
            empty += 1
        else:
            assert k >= int(0.2 * len(ids))
        assert not s.text_only
    # empty prefixes come only from the empty_prefix_prob draw here (0.2 x n >= 1 for these captions)
    assert abs(empty / n_keys - 0.3) < 0.05


def test_split_is_deterministic_in_key_and_seed(tok_path: Path) -> None:
    a, b = make_model(tok_path, seed=0), make_model(tok_path, seed=1)  # different weights, same cuts
    keys = [f"{i:09d}" for i in range(50)]
    cuts_a = [split_view(a).split_caption(CAPTIONS[2], k) for k in keys]
    assert cuts_a == [split_view(b).split_caption(CAPTIONS[2], k) for k in keys]
    assert len({len(s.prefix) for s in cuts_a}) > 2, "different keys give different cuts"
    a.split_seed = 1
    assert [split_view(a).split_caption(CAPTIONS[2], k) for k in keys] != cuts_a


def test_long_caption_truncated(tok_path: Path) -> None:
    model = make_model(tok_path, max_text_len=8)
    s = split_view(model).split_caption(" ".join(CAPTIONS), key="k")
    assert len(s.prefix) + len(s.target) == 8  # max_text_len - 1 caption tokens + EOS


def test_labels_cover_only_the_suffix(tok_path: Path) -> None:
    model = make_model(tok_path, empty_prefix_prob=0.0, min_prefix_frac=0.3, max_prefix_frac=0.5)
    keys = [f"k{i}" for i in range(len(CAPTIONS))]
    out = run(model, torch.randn(len(CAPTIONS), 3, 32, 32), CAPTIONS, keys)
    labels, logits = out["labels"], out["logits"]
    assert logits.shape[:2] == labels.shape and logits.shape[2] == model.tokenizer.vocab_size
    for row, caption, k in zip(labels, CAPTIONS, out["prefix_len"].tolist()):
        ids = model.tokenizer.encode(caption)
        assert k > 0
        valid = row[row != IGNORE_INDEX].tolist()
        assert valid == ids[k:] + [model.tokenizer.eos_id]  # suffix + EOS, no prefix token
        assert (row[len(valid) :] == IGNORE_INDEX).all()
    # teacher forcing: decoder input = [start] + labels shifted right
    lab, _ = pad_ids([[5, 6, 2], [7, 2]], IGNORE_INDEX)
    dec_in = model.decoder_inputs(lab)
    assert dec_in.tolist() == [[model.start_id, 5, 6], [model.start_id, 7, 2]]  # position 2 of row 1 is ignored
    assert lab.tolist() == [[5, 6, 2], [7, 2, IGNORE_INDEX]]


def test_prefix_reaches_the_encoder_and_padding_does_not(tok_path: Path) -> None:
    model = make_model(tok_path).eval()
    tokens = model.encode_images(torch.randn(2, 3, 32, 32))
    p1, p2 = model.tokenizer.encode("a small red"), model.tokenizer.encode("two large blue squares")
    ids, ids_mask = pad_ids([p1, p2], model.tokenizer.pad_id)
    enc, mask = model.encoder_inputs(tokens, ids, ids_mask, torch.tensor([False, False]))
    n = tokens.shape[1]
    assert enc.shape == (2, n + len(p2), model.d_model)
    assert mask[0].tolist() == [1] * (n + len(p1)) + [0] * (len(p2) - len(p1))
    # a longer padded batch gives the same logits for the short row
    dec_in = model.decoder_inputs(torch.tensor([[5, 6, 2]]))
    enc1, mask1 = model.encoder_inputs(tokens[:1], *pad_ids([p1], model.tokenizer.pad_id), torch.tensor([False]))
    alone = model.seq2seq(inputs_embeds=enc1, attention_mask=mask1, decoder_input_ids=dec_in).logits
    together = model.seq2seq(inputs_embeds=enc[:1], attention_mask=mask[:1], decoder_input_ids=dec_in).logits
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_empty_caption_gets_no_loss(tok_path: Path) -> None:
    model = make_model(tok_path)
    out = run(model, torch.randn(2, 3, 32, 32), ["", CAPTIONS[0]], ["a", "b"])
    assert (out["labels"][0] == IGNORE_INDEX).all() and (out["labels"][1] != IGNORE_INDEX).any()
    out = run(model, torch.randn(2, 3, 32, 32), ["", "   "], ["a", "b"])
    assert (out["labels"] == IGNORE_INDEX).all() and torch.isfinite(out["logits"]).all()


def test_text_only_samples(tok_path: Path) -> None:
    image_only = make_model(tok_path)
    with pytest.raises(UserError, match="without images.*sample 'key0'"):
        run(image_only, None, CAPTIONS[:2], ["key0", "key1"], has_images=False)
    with pytest.raises(UserError, match="needs images"):
        image_only.caption(None, prefix="a small")

    model = make_model(tok_path, text_only_ratio=1.0).eval()
    splits = [split_view(model).split_caption(c, f"k{i}") for i, c in enumerate(CAPTIONS)]
    assert all(s.text_only and len(s.prefix) >= 1 for s in splits)
    # image tokens are masked out: the images do not change the output
    a = run(model, torch.randn(3, 3, 32, 32), CAPTIONS[:3], ["a", "b", "c"])["logits"]
    b = run(model, torch.randn(3, 3, 32, 32), CAPTIONS[:3], ["a", "b", "c"])["logits"]
    torch.testing.assert_close(a, b)
    c = run(model, None, CAPTIONS[:3], ["a", "b", "c"], has_images=False)["logits"]  # no images at all
    assert c.shape == a.shape and torch.isfinite(c).all()
    completions = model.caption(None, prefix=["a small", "two"], max_new_tokens=4)
    assert completions[0].startswith("a small") and completions[1].startswith("two")


def _overfit(model: PrefixLM, images: torch.Tensor, captions: list[str], steps: int = 40) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        out = run(model, images, captions, [f"{i}-{step}" for i in range(len(captions))])
        loss = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), out["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def fitted(tok_path: Path) -> tuple[PrefixLM, torch.Tensor]:
    model = make_model(tok_path, seed=3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _overfit(model, images, CAPTIONS[:4])
    return model, images


def test_kv_cache_does_not_change_greedy_output(fitted: tuple[PrefixLM, torch.Tensor]) -> None:
    model, images = fitted
    cached = model.caption(images, max_new_tokens=12, use_cache=True)
    assert sum(len(c.split()) for c in cached) > 8, "the overfit model writes words, not empty strings"
    assert cached == model.caption(images, max_new_tokens=12, use_cache=False)
    with_prefix = model.caption(images, prefix="a small", max_new_tokens=8)
    assert with_prefix == model.caption(images, prefix="a small", max_new_tokens=8, use_cache=False)


def test_generation_options(fitted: tuple[PrefixLM, torch.Tensor]) -> None:
    model, images = fitted
    model.train()  # caption() switches to eval itself and restores the mode
    beams = model.caption(images, num_beams=3, max_new_tokens=10)
    assert model.training and len(beams) == 4 and all(isinstance(c, str) for c in beams)
    torch.manual_seed(0)
    sampled = model.caption(images, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=6)
    torch.manual_seed(0)
    assert sampled == model.caption(images, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=6)
    out = model.caption(images, min_new_tokens=3, max_new_tokens=3, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert all(len(model.tokenizer.encode(c)) >= 1 for c in out)
    model.eval()


def test_prefix_is_kept_verbatim(fitted: tuple[PrefixLM, torch.Tensor]) -> None:
    model, images = fitted
    out = model.caption(images, prefix="A Small", max_new_tokens=5)
    assert all(c.startswith("A Small") for c in out)
    per_image = ["two", "a picture of", "there is", "an image"]
    out = model.caption(images, prefix=per_image, max_new_tokens=5)
    assert all(c.startswith(p) for c, p in zip(out, per_image))
    # joining at ANY token cut, inside a word included, gives back the caption (no glued-in spaces)
    tok = model.tokenizer
    for caption in CAPTIONS:
        ids = tok.encode(caption)
        for k in range(1, len(ids)):
            assert model._join(tok.decode(ids[:k]), ids[:k], ids[k:] + [tok.eos_id, 7]) == caption
    assert model._join("A SMALL ", tok.encode("a small"), tok.encode("red circle")) == "A SMALL red circle"


def test_bad_prefixes(fitted: tuple[PrefixLM, torch.Tensor]) -> None:
    model, images = fitted
    with pytest.raises(UserError, match=r"has \d+ tokens; the model takes at most 23"):
        model.caption(images, prefix=" ".join(CAPTIONS))
    with pytest.raises(UserError, match="3 prefixes for 4 images"):
        model.caption(images, prefix=["a", "b", "c"])


def test_bad_configs(tok_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="min_prefix_frac"):
        make_model(tok_path, min_prefix_frac=0.6, max_prefix_frac=0.5)
    with pytest.raises(UserError, match="empty_prefix_prob"):
        make_model(tok_path, empty_prefix_prob=1.5)
    with pytest.raises(UserError, match="divisible"):
        make_model(tok_path, d_model=66, num_heads=4)
    with pytest.raises(UserError, match="patch_size"):
        make_model(tok_path, patch_size=7)


def test_hf_decoder_and_vocab_mismatch(tok_path: Path, tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(model_config({"preset": "prefixlm-tiny", "text": {"tokenizer": str(tok_path)}}).text)
    small = T5Config(vocab_size=20, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(small).save_pretrained(tmp_path / "t5-small-vocab")
    with pytest.raises(UserError, match=rf"has {tok.vocab_size} tokens but the decoder's vocabulary has 20"):
        make_model(tok_path, hf_name=str(tmp_path / "t5-small-vocab"))
    big = T5Config(vocab_size=tok.vocab_size + 8, d_model=48, d_kv=12, d_ff=64, num_heads=4, num_layers=1)
    T5ForConditionalGeneration(big).save_pretrained(tmp_path / "t5-ok")
    model = make_model(tok_path, hf_name=str(tmp_path / "t5-ok"))
    assert model.d_model == 48  # the image stem follows the loaded decoder's width
    out = run(model, torch.randn(2, 3, 32, 32), CAPTIONS[:2], ["a", "b"])
    assert out["logits"].shape[-1] == tok.vocab_size + 8
    with pytest.raises(UserError, match="cannot load"):
        make_model(tok_path, hf_name=str(tmp_path / "missing-model"))


def test_conv_stem_and_presets(tok_path: Path) -> None:
    cfg = model_config(
        {
            "preset": "prefixlm-small",
            "image": {"timm_name": "test_resnet", "image_size": 64},
            "text": {"tokenizer": str(tok_path)},
            "decoder": {"d_model": 32, "d_ff": 64, "encoder_layers": 1, "decoder_layers": 1},
        }
    )
    model = build_model(cfg)
    assert model.image_stem.num_tokens == 16  # stride 16 at 64 px
    assert model.encode_images(torch.randn(2, 3, 64, 64)).shape == (2, 16, 32)
    assert model.encode_images(torch.randn(2, 3, 96, 96)).shape == (2, 36, 32)  # position embeddings resized
    pre = model.preprocess_cfg()
    assert pre["image_size"] == 64 and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    model.set_grad_checkpointing(True)
    out = run(model, torch.randn(2, 3, 64, 64), CAPTIONS[:2], ["a", "b"])
    out["logits"].logsumexp(-1).mean().backward()
    assert model.image_stem.trunk.conv1[0].weight.grad is not None
    for name in ("prefixlm-tiny", "prefixlm-tiny-conv", "prefixlm-small", "prefixlm-base"):
        cfg = model_config(name)
        assert cfg.arch == "prefix_lm" and cfg.decoder.d_model % cfg.decoder.num_heads == 0
