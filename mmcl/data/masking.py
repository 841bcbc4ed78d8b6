"""Masked captions for masked-token prediction (BERT, Devlin et al. 2019; the MLM term of DeCLIP, Li et al. 2022).

`MaskedTokensView` is the loader view of the `mlm` loss term: each caption tokenized as the collator does,
then max(1, round(p * n)) of its n real tokens (not the start/end markers, not padding) chosen, and each
chosen token replaced by the mask token (80%), a random token (10%) or left as it is (10%), BERT's rule.
The labels hold the original ids at the chosen positions and IGNORE_INDEX elsewhere. The choice is drawn
from an RNG seeded by (seed, sample key), so exact resume and every process see the same masks; a sample
is masked the same way in every epoch (BERT's static masking; RoBERTa re-draws per epoch).

The mask token (`mask_token_id`): the tokenizer's own when it has one (BERT's [MASK] for HF towers);
otherwise its start-of-text id. CLIP's BPE has no [MASK] and no unused id (49406 BPE tokens, then
<start_of_text> and <end_of_text>); the start marker only ever occurs at position 0, so anywhere else it
is unambiguous, and the vocabulary, the checkpoints and open_clip compatibility stay as they are.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

from mmcl.data.views import IGNORE_INDEX
from mmcl.utils import UserError

MASK, RANDOM = 0.8, 0.9  # BERT: u < 0.8 -> [MASK], 0.8 <= u < 0.9 -> a random token, else keep


def mask_token_id(tokenizer) -> int:
    """The id a masked position gets: the tokenizer's mask token, else its start-of-text token."""
    hf = getattr(tokenizer, "hf", None)  # `HFTokenizer`: the transformers tokenizer
    mask = getattr(hf, "mask_token_id", None) if hf is not None else None
    if mask is not None:
        return int(mask)
    if tokenizer.bos_id is not None:
        return int(tokenizer.bos_id)
    raise UserError(f"{tokenizer!r} has neither a mask token nor a start-of-text token to mask captions with")


class MaskedTokensView:
    """Loader view: `ids` (B, L) masked ids, `mask` (B, L) 1 = real token, `labels` (B, L)
    original ids at the chosen positions, IGNORE_INDEX elsewhere.

    Args:
        tokenizer: the text tower's `mmcl.data.text.Tokenizer` (rows laid out as the collator's).
        mask_id: the id of masked positions (`mask_token_id`).
        mask_prob: the share of each caption's real tokens chosen (BERT: 0.15), at least one.
        seed: varies the masks.
    """

    kind = "batch"

    def __init__(self, tokenizer, mask_id: int, mask_prob: float = 0.15, seed: int = 0) -> None:
        if not 0 < mask_prob <= 1:
            raise UserError(f"mlm mask_prob must be in (0, 1], got {mask_prob}")
        self.tokenizer, self.mask_id, self.mask_prob, self.seed = tokenizer, mask_id, mask_prob, seed
        specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, mask_id}
        hf = getattr(tokenizer, "hf", None)
        specials |= set(getattr(hf, "all_special_ids", ()) if hf is not None else ())
        self.specials = frozenset(i for i in specials if i is not None)  # never drawn as random replacements

    def random_token(self, rng: random.Random) -> int:
        """A uniformly drawn ordinary token (no special token: it would mark a position as masked)."""
        while True:
            token = rng.randrange(self.tokenizer.vocab_size)
            if token not in self.specials:
                return token

    def mask_row(self, ids: torch.Tensor, length: int, key: str) -> torch.Tensor:
        """Mask one tokenized row in place (its first `length` entries are real); returns its labels."""
        labels = torch.full_like(ids, IGNORE_INDEX)
        first = 1 if self.tokenizer.bos_id is not None else 0
        candidates = list(range(first, length - 1))  # the last real token is the EOS
        if not candidates:
            return labels
        digest = hashlib.blake2b(f"{self.seed}/mlm/{key}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        k = max(1, round(self.mask_prob * len(candidates)))
        for pos in sorted(rng.sample(candidates, k)):
            labels[pos] = ids[pos]
            u = rng.random()
            if u < MASK:
                ids[pos] = self.mask_id
            elif u < RANDOM:
                ids[pos] = self.random_token(rng)
        return labels

    def __call__(self, captions: list[str], keys: list[str] | None, has_images: bool = True) -> dict[str, Any]:
        keys = list(keys) if keys else list(captions)
        ids, mask = self.tokenizer(captions)  # (B, L) each, as the collator tokenizes `batch.text`
        labels = torch.stack([self.mask_row(row, int(m.sum()), key) for row, m, key in zip(ids, mask, keys)])
        return {"ids": ids, "mask": mask, "labels": labels}
