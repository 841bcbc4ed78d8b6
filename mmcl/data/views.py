"""Named views: inputs a loss term needs beyond the image and its tokenized caption, built in the
loader workers (deterministically per sample, so exact resume keeps working) and carried by name
in `Batch.views`.

Two kinds:

* `ImageView`: another transform of the same decoded image (SimCLR / SLIP's second augmented
  view, each with its own augmentation settings), drawn from the sample's own RNG;
* batch views (`CaptionSplitView`): made at collate time from the batch's captions and keys,
  e.g. PrefixLM's prefix/suffix cut and tokenization.

A term returns `{name: view}` from `LossTerm.views(model)`; `mmcl.data.pipeline.build_stream` hands
them to the `SampleDecoder` / `Collator` of the stream.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value ignored by the loss (HF / torch cross-entropy convention)


class ImageView:
    """A second (third, ...) view of the sample's image: `transform(pil, rng)` -> (3, S, S) tensor.

    Collated by stacking into `batch.views[name]` (B, 3, S, S). The transform draws from the
    per-sample RNG after the main view, so every view is a pure function of (seed, epoch, key).
    """

    kind = "sample"

    def __init__(self, transform) -> None:
        self.transform = transform

    @property
    def spec(self) -> Any:
        """The transform's `spec` (hashable; equal specs draw equal views), None when it has none (never shared)."""
        return getattr(self.transform, "spec", None)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.transform(image, rng)


@dataclass
class PrefixSplit:
    """One caption cut for PrefixLM training.

    prefix: token ids given to the encoder after the image tokens.
    target: token ids the decoder must produce (suffix + EOS); empty = no loss for this sample.
    text_only: the sample is trained without its image (SimVLM's text-only documents).
    """

    prefix: list[int]
    target: list[int]
    text_only: bool = False


def _uniforms(key: str, seed: int, n: int) -> list[float]:
    """`n` numbers in [0, 1) that depend only on (seed, key): stable across processes and resumes."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8 * n).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") / 2**64 for i in range(n)]


class CaptionSplitView:
    """PrefixLM's inputs from raw captions (SimVLM, Wang et al. 2021): each caption tokenized and cut
    at a random token into a prefix (encoder) and a target (decoder).

    Produces `prefix_ids` (B, P) and `prefix_mask` (B, P) (right-padded), `lm_labels` (B, T) (target
    ids + EOS, IGNORE_INDEX where there is none) and `text_only` (B,) bool. The cut of a sample depends
    only on (its key, `split_seed`), so a resumed run cuts every caption as the uninterrupted one did.

    Args:
        tokenizer: the decoder's `mmcl.data.text.Tokenizer`.
        dcfg: `DecoderConfig` (max_text_len, prefix fractions, empty_prefix_prob, text_only_ratio).
        split_seed: varies the cuts.
    """

    kind = "batch"

    def __init__(self, tokenizer, dcfg, split_seed: int = 0) -> None:
        self.tokenizer, self.dcfg, self.split_seed = tokenizer, dcfg, split_seed

    def split_caption(self, caption: str, key: str, has_image: bool = True) -> PrefixSplit:
        """Tokenize and cut one caption (deterministic in `key` and `split_seed`).

        Captions longer than `max_text_len - 1` tokens are truncated (the EOS needs a slot). An
        empty caption gets no target (no loss). A sample is text-only when it has no image or, with
        probability `text_only_ratio`, by draw; a text-only caption keeps at least one prefix token
        (the encoder needs an input). Otherwise the prefix is empty with probability
        `empty_prefix_prob` (plain captioning), else floor(f * n) tokens with f uniform in
        [min_prefix_frac, max_prefix_frac], at most n - 1 so something is left to predict.
        """
        d = self.dcfg
        ids = self.tokenizer.encode(caption.strip())[: d.max_text_len - 1]
        n = len(ids)
        u_empty, u_frac, u_text = _uniforms(key, self.split_seed, 3)
        text_only = not has_image or (u_text < d.text_only_ratio and n > 0)
        if n == 0:
            return PrefixSplit([], [], text_only)
        frac = d.min_prefix_frac + u_frac * (d.max_prefix_frac - d.min_prefix_frac)
        if text_only:
            k = n if n == 1 else min(max(int(frac * n), 1), n - 1)
        elif u_empty < d.empty_prefix_prob:
            k = 0
        else:
            k = min(int(frac * n), n - 1)
        return PrefixSplit(ids[:k], ids[k:] + [self.tokenizer.eos_id], text_only)

    def split_batch(self, captions: list[str], keys: list[str] | None, has_images: bool) -> list[PrefixSplit]:
        """`split_caption` for a batch; keys default to the captions themselves."""
        from mmcl.utils import UserError

        if not has_images and self.dcfg.text_only_ratio == 0:
            first = f" (sample '{keys[0]}')" if keys else ""
            raise UserError(
                f"a batch without images{first} reached an image-captioning model: set "
                "decoder.text_only_ratio > 0 to train on text-only samples"
            )
        keys = list(keys) if keys else list(captions)
        if len(keys) != len(captions):
            raise ValueError(f"{len(keys)} keys for {len(captions)} captions")
        return [self.split_caption(c, k, has_images) for c, k in zip(captions, keys)]

    def __call__(self, captions: list[str], keys: list[str] | None, has_images: bool = True) -> dict[str, Any]:
        splits = self.split_batch(captions, keys, has_images)
        prefix_ids, prefix_mask = pad_ids([s.prefix for s in splits], self.tokenizer.pad_id)
        labels, _ = pad_ids([s.target for s in splits], IGNORE_INDEX, min_len=1)
        return {
            "prefix_ids": prefix_ids,
            "prefix_mask": prefix_mask,
            "lm_labels": labels,
            "text_only": torch.tensor([s.text_only for s in splits]),
        }


def pad_ids(rows: list[list[int]], pad: int, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: (B, L) ids and (B, L) mask (1 = real token), L = max(longest, min_len)."""
    length = max(max((len(r) for r in rows), default=0), min_len)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def repeat_words(caption: str, rate: float, rng: random.Random) -> str:
    """ESimCSE's word repetition (Wu et al. 2021): a random number of the caption's words, up to
    max(2, rate * n), each said twice in place, so a positive pair differs in length, not in meaning."""
    words = caption.split()
    if not words or rate <= 0:
        return caption
    count = min(rng.randint(0, max(2, int(rate * len(words)))), len(words))
    chosen = set(rng.sample(range(len(words)), count))
    return " ".join(w for i, word in enumerate(words) for w in ([word, word] if i in chosen else [word]))


def cut_words(caption: str, rate: float, rng: random.Random) -> str:
    """ConSERT's token cutoff (Yan et al. 2021) at the word level: each word dropped with probability `rate`
    (at least one word kept)."""
    words = caption.split()
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept or words[:1])


def shuffle_words(caption: str, rng: random.Random) -> str:
    """ConSERT's token shuffling at the word level: the caption's words in a random order."""
    words = caption.split()
    rng.shuffle(words)
    return " ".join(words)


class EditedCaptionView:
    """Loader view: each caption edited into a second text view, tokenized as `ids`, `mask` (B, L): ESimCSE's
    word repetition (`repeat_words`, `repetition` > 0), ConSERT's token cutoff (`cut_words`, `cutoff` > 0)
    and shuffling (`shuffle_words`), applied in that order. The edit of a sample depends only on (its key,
    `seed`): resume and every process see the same.

    Args:
        tokenizer: the text tower's `mmcl.data.text.Tokenizer`.
        repetition: ESimCSE's duplication rate (0.32 in the paper; 0 = off).
        cutoff: share of words dropped (ConSERT's token cutoff; 0 = off).
        shuffle: shuffle the words (ConSERT's token shuffling).
        seed: varies the edits.
    """

    kind = "batch"

    def __init__(
        self, tokenizer, repetition: float = 0.0, cutoff: float = 0.0, shuffle: bool = False, seed: int = 0
    ) -> None:
        self.tokenizer, self.repetition, self.cutoff, self.shuffle, self.seed = (
            tokenizer,
            repetition,
            cutoff,
            shuffle,
            seed,
        )

    def edit(self, caption: str, key: str) -> str:
        digest = hashlib.blake2b(f"{self.seed}/edit/{key}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        if self.repetition > 0:
            caption = repeat_words(caption, self.repetition, rng)
        if self.cutoff > 0:
            caption = cut_words(caption, self.cutoff, rng)
        return shuffle_words(caption, rng) if self.shuffle else caption

    def __call__(self, captions: list[str], keys: list[str] | None, has_images: bool = True) -> dict[str, Any]:
        keys = list(keys) if keys else list(captions)
        ids, mask = self.tokenizer([self.edit(c, k) for c, k in zip(captions, keys)])
        return {"ids": ids, "mask": mask}


class CounterfactualView:
    """The sample's counterfactual (`KEY.cf.<image ext>` + `KEY.cf.txt`, README "Counterfactual images"):
    its image through the main image's transform with the main image's augmentation draws (so the pair
    differs by the edit only), its caption tokenized, and whether the sample has one.

    A per-sample view that reads the raw sample (`reads_raw`: `SampleDecoder` calls `from_raw`); its parts
    are collated under `NAME/image` (B, 3, S, S) float, `NAME/text`, `NAME/mask` (B, L) long and
    `NAME/valid` (B,) bool. A sample without a counterfactual, or whose counterfactual is unusable (then
    counted as 'bad_counterfactual', the sample kept), gets a zero image, an empty caption and valid=False.

    Args:
        tokenizer: the text tower's `mmcl.data.text.Tokenizer`.
    """

    kind = "sample"
    reads_raw = True

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def from_raw(
        self, raw: dict[str, Any], rng_state: tuple, transform, max_pixels: int
    ) -> tuple[dict[str, torch.Tensor], list[Exception]]:
        """(parts, reasons left out) of one raw sample; `rng_state` is the per-sample RNG's state before the main
        image's transform, `transform(pil, rng)` the main image's (normalised float output)."""
        from mmcl.data.decode import SkipSample, decode_counterfactual

        left_out: list[Exception] = []
        try:
            cf = decode_counterfactual(raw, max_pixels)
        except SkipSample as e:
            cf, left_out = None, [e]
        rng = random.Random()
        rng.setstate(rng_state)
        if cf is None:  # a blank stand-in of the transform's output shape, masked out by the loss
            image = torch.zeros_like(transform(Image.new("RGB", (8, 8)), rng))
        else:
            image = transform(cf[0], rng)
        ids, mask = self.tokenizer([cf[1] if cf is not None else ""])
        parts = {"image": image, "text": ids[0], "mask": mask[0], "valid": torch.tensor(cf is not None)}
        return parts, left_out
