"""Hard-negative captions made by rule, without any model (NegCLIP, Yuksekgonul et al. 2023, "When and
Why Vision-Language Models Behave like Bags-of-Words, and What to Do About It").

Three rules, each giving a caption with the same words (or the same kinds of words) that no longer
describes the image:

* `swap`: exchange two content words ("a red circle left of a blue square" -> "a blue circle left
  of a red square");
* `replace`: replace an attribute word by another word of its kind (colour, size, number, position,
  material) seen in the batch's captions, else from the kind's lexicon;
* `shuffle`: shuffle the words within each trigram.

A negative always differs from its caption; a caption that no rule can change gets none (masked).
`HardNegativesView` is the loader view: for each caption `count` negatives, tokenized, drawn from
a per-sample RNG seeded by (seed, key), so exact resume keeps working.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

# torch is imported where used: NegCLIP's options name `RULES`, and reading a config must not import torch

KINDS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
               "grey", "cyan", "magenta", "violet", "gold", "silver"),
    "size": ("small", "large", "big", "little", "tiny", "huge", "medium", "tall", "short", "long"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "several",
               "many"),
    "position": ("left", "right", "top", "bottom", "middle", "center", "centre", "above", "below", "under",
                 "over", "behind", "front", "inside", "outside", "near", "far"),
    "material": ("wooden", "metal", "glass", "plastic", "stone", "paper", "leather", "cotton"),
}  # fmt: skip
KIND_OF = {w: k for k, words in KINDS.items() for w in words}
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "and",
        "or",
        "with",
        "is",
        "are",
        "there",
        "this",
        "that",
        "it",
        "its",
        "by",
        "for",
        "from",
        "as",
        "into",
        "onto",
        "some",
    ]
)
RULES = ("swap", "replace", "shuffle")
WORD = re.compile(r"[A-Za-z]+")


def _words(caption: str) -> list[str]:
    return caption.split()


def _core(token: str) -> str:
    m = WORD.search(token)
    return m.group(0).lower() if m else ""


def swap(caption: str, rng: random.Random, vocab: dict[str, list[str]] | None = None) -> str | None:
    """Exchange two different content words (first preference: two attribute words of one kind)."""
    words = _words(caption)
    content = [i for i, w in enumerate(words) if _core(w) and _core(w) not in STOPWORDS]
    by_kind: dict[str, list[int]] = {}
    for i in content:
        kind = KIND_OF.get(_core(words[i]))
        if kind:
            by_kind.setdefault(kind, []).append(i)
    pairs = [
        (a, b) for idx in by_kind.values() for a in idx for b in idx if a < b and _core(words[a]) != _core(words[b])
    ]
    if not pairs:
        pairs = [(a, b) for a in content for b in content if a < b and _core(words[a]) != _core(words[b])]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    words[a], words[b] = words[b], words[a]
    return " ".join(words)


def replace(caption: str, rng: random.Random, vocab: dict[str, list[str]] | None = None) -> str | None:
    """Replace one attribute word by another of its kind (from `vocab`, the batch's words of that kind,
    when it offers another one; else from the kind's lexicon)."""
    words = _words(caption)
    slots = [i for i, w in enumerate(words) if _core(w) in KIND_OF]
    if not slots:
        return None
    i = rng.choice(slots)
    old = _core(words[i])
    kind = KIND_OF[old]
    seen = [w for w in (vocab or {}).get(kind, []) if w != old]
    choices = seen or [w for w in KINDS[kind] if w != old]
    words[i] = words[i].lower().replace(old, rng.choice(sorted(choices)), 1)
    return " ".join(words)


def shuffle(caption: str, rng: random.Random, vocab: dict[str, list[str]] | None = None) -> str | None:
    """Shuffle the words inside each consecutive trigram."""
    words = _words(caption)
    if len(set(words)) < 2:
        return None
    for _ in range(10):
        out = []
        for i in range(0, len(words), 3):
            tri = words[i : i + 3]
            rng.shuffle(tri)
            out += tri
        if out != words:
            return " ".join(out)
    return None


RULE_FNS = {"swap": swap, "replace": replace, "shuffle": shuffle}


def batch_vocab(captions: list[str]) -> dict[str, list[str]]:
    """The attribute words of each kind that occur in `captions` (sorted: deterministic)."""
    found: dict[str, set[str]] = {}
    for c in captions:
        for w in _words(c):
            kind = KIND_OF.get(_core(w))
            if kind:
                found.setdefault(kind, set()).add(_core(w))
    return {k: sorted(v) for k, v in found.items()}


def hard_negatives(
    caption: str, rng: random.Random, count: int, rules: tuple[str, ...] = RULES, vocab=None
) -> list[str]:
    """Up to `count` distinct negatives of `caption`, each by a rule drawn from `rules`."""
    out: list[str] = []
    for _ in range(4 * count):
        if len(out) == count:
            break
        neg = RULE_FNS[rng.choice(rules)](caption, rng, vocab)
        if neg and neg.lower() != caption.lower() and neg not in out:
            out.append(neg)
    return out


class HardNegativesView:
    """Loader view: `neg_text` (B, count, L) token ids, `neg_mask` (B, count, L), `neg_valid` (B, count)."""

    kind = "batch"

    def __init__(self, tokenizer, count: int = 3, rules: tuple[str, ...] = RULES, seed: int = 0) -> None:
        unknown = set(rules) - set(RULE_FNS)
        if unknown:
            raise ValueError(f"unknown hard-negative rules {sorted(unknown)}; known: {list(RULE_FNS)}")
        self.tokenizer, self.count, self.rules, self.seed = tokenizer, count, tuple(rules), seed

    def __call__(self, captions: list[str], keys: list[str] | None, has_images: bool = True) -> dict[str, Any]:
        import torch

        keys = list(keys) if keys else list(captions)
        vocab = batch_vocab(captions)
        rows, valid = [], []
        for caption, key in zip(captions, keys):
            digest = hashlib.blake2b(f"{self.seed}/neg/{key}".encode(), digest_size=8).digest()
            negs = hard_negatives(
                caption, random.Random(int.from_bytes(digest, "little")), self.count, self.rules, vocab
            )
            valid.append([True] * len(negs) + [False] * (self.count - len(negs)))
            rows += negs + [caption] * (self.count - len(negs))  # placeholders, masked out by neg_valid
        ids, mask = self.tokenizer(rows)  # (B * count, L)
        b = len(captions)
        return {
            "neg_text": ids.view(b, self.count, -1),
            "neg_mask": mask.view(b, self.count, -1),
            "neg_valid": torch.tensor(valid, dtype=torch.bool),
        }
