"""Train a small BPE or WordPiece tokenizer on captions (HF `tokenizers`), saved as `tokenizer.json`.

A captioning model on a narrow domain needs far fewer than CLIP's 49k tokens: a
1k-token vocabulary learned from the captions themselves makes the output
softmax ~50x cheaper. Point `model.text.tokenizer` at the saved file.

Inputs: shards (a .tar, a directory of .tar, a glob or brace pattern, read with
`mmcl.data.reader`; only the `.txt` and `.json` members are read, nothing else is
decoded; captions follow `mmcl.data.decode.caption_options`) or plain text files
(one caption per line).

Layout of the saved tokenizer: special tokens `<pad>`=0, `<s>`=1, `</s>`=2,
`<unk>`=3 (T5/BART/RoBERTa names, so `PreTrainedTokenizerFast` and mmcl's
tokenizer wrapper find them), lowercasing NFKC normaliser (optional), and a
post-processor that wraps a sequence as `<s> ... </s>` (encode with
`add_special_tokens=False` for the bare ids). BPE uses SentencePiece-style
`▁` word markers (Metaspace), so decoding restores the spaces exactly and a
word-aligned prefix tokenizes the same way alone as inside its caption.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from mmcl.data.decode import SkipCounter, SkipSample, caption_options, decode_json, describe_counts
from mmcl.data.reader import expand_shards, read_samples
from mmcl.utils import UserError, atomic_write_text

log = logging.getLogger("mmcl.data")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order


def _shard_captions(shards: list[str], caption_key: str, counter: SkipCounter) -> Iterator[str]:
    """Every caption of every sample (the data layer's caption rule), reading only `.txt` and `.json` members."""
    for raw in read_samples(shards, counter, select=lambda name: name.rsplit(".", 1)[-1].lower() in ("txt", "json")):
        try:
            meta = decode_json(raw) if caption_key != "txt" else {}
            yield from caption_options(raw, meta, caption_key)
        except SkipSample as e:
            counter.add(e.reason, f"{raw.get('__url__', '?')}:{raw['__key__']}", e.detail)


def iter_captions(inputs: Iterable[str], caption_key: str = "txt", max_samples: int = 0) -> Iterator[str]:
    """Captions from shards (.tar / directory / glob / brace pattern) and text files (one caption per line).

    Unreadable shards and samples without a caption are skipped and counted; when no caption at all could
    be read and some shard was unreadable, a `UserError` says what was skipped.

    Args:
        inputs: paths or patterns; `.txt` files are read line by line, everything else as shards.
        caption_key: `txt` for the `.txt` member, or a key of the sample's `.json`.
        max_samples: stop after this many captions (0 = all).
    """
    inputs = list(inputs)
    counter = SkipCounter(log)
    count = 0
    for item in inputs:
        if item.endswith(".txt") and not Path(item).is_dir():
            if not Path(item).is_file():
                raise UserError(f"caption file not found: {item}")
            lines = (line.strip() for line in Path(item).read_text(encoding="utf-8").splitlines())
            source: Iterator[str] = (line for line in lines if line)
        else:
            source = _shard_captions(expand_shards(item), caption_key, counter)
        for caption in source:
            yield caption
            count += 1
            if max_samples and count >= max_samples:
                return
    if not count and counter.counts.get("unreadable_tar"):
        raise UserError(f"no captions read from {', '.join(inputs)}: skipped {describe_counts(counter.counts)}")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    min_frequency: int = 2,
    lowercase: bool = True,
):
    """Learn a tokenizer from `texts`; returns a `tokenizers.Tokenizer` with the specials at ids 0-3.

    The learned vocabulary can be smaller than `vocab_size` when the corpus is small.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab size {vocab_size} is too small (the special tokens alone take {len(SPECIAL_TOKENS)})")
    # NFKC, whitespace runs -> one space, trimmed (else Metaspace turns every extra space into a token)
    norm = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    norm += [normalizers.Lowercase()] if lowercase else []
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
    else:
        raise UserError(f"unknown tokenizer kind '{kind}' (expected 'bpe' or 'wordpiece')")
    tok.normalizer = normalizers.Sequence(norm)

    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise UserError("no captions found to train the tokenizer on")
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, "trainers put special tokens first"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
    )
    log.info("trained a %s tokenizer: %d tokens from %d captions", kind, tok.get_vocab_size(), seen)
    return tok


def save_tokenizer(tok, path: str | Path) -> Path:
    """Write `tok` (a `tokenizers.Tokenizer`) as a `tokenizer.json`, atomically."""
    path = Path(path)
    atomic_write_text(path, tok.to_str(pretty=True))
    return path


def train_tokenizer_file(
    inputs: list[str],
    out: str | Path,
    vocab_size: int = 1000,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    min_frequency: int = 2,
    lowercase: bool = True,
    caption_key: str = "txt",
    max_samples: int = 0,
) -> dict[str, Any]:
    """Train on the captions of `inputs` (see `iter_captions`) and save to `out`; returns a summary."""
    texts = iter_captions(inputs, caption_key=caption_key, max_samples=max_samples)
    tok = train_tokenizer(texts, vocab_size=vocab_size, kind=kind, min_frequency=min_frequency, lowercase=lowercase)
    save_tokenizer(tok, out)
    return {"path": str(out), "vocab_size": tok.get_vocab_size(), "kind": kind}
