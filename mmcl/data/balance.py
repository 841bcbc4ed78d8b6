"""Long-tail balancing of the training stream (MetaCLIP, Xu et al. 2023, "Demystifying CLIP Data").

A vocabulary of concepts (entries: words or word n-grams; the user's file, one per line, or every word of
the captions) is matched in each caption; one pass over the shards counts each entry's captions c_e and
saves the counts (JSON). A sample whose caption matches the entries E is then kept with MetaCLIP's
probability

    p(E) = 1 - prod_{e in E} (1 - min(1, t / c_e))        (0 when E is empty: MetaCLIP drops unmatched text)

so a head entry (c_e > t) keeps about t of its captions and a tail entry (c_e <= t) all of them. The draw
of a sample is a pure function of (seed, key): the same samples are kept in every epoch and in a resumed
run (exact resume), and dropped ones count as skipped ('balanced'). Matching is on whole words (n-grams
up to the longest entry), not MetaCLIP's substrings, so 'cat' does not match 'category'.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmcl.data.decode import SkipCounter, SkipSample, decode_caption, decode_json
from mmcl.data.views import _uniforms
from mmcl.utils import UserError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(caption: str) -> list[str]:
    """Lower-case words of a caption."""
    return _WORD.findall(caption.lower())


def load_vocabulary(path: str | Path) -> set[str]:
    """Entries of a vocabulary file, one per line (normalised to lower-case single-spaced words)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data.balance.vocabulary {path}: cannot read it ({e})") from None
    entries = {" ".join(words(line)) for line in lines} - {""}
    if not entries:
        raise UserError(f"data.balance.vocabulary {path}: no entries (one word or phrase per line)")
    return entries


def match(caption: str, vocabulary: set[str] | None, max_words: int = 1) -> set[str]:
    """The entries of `vocabulary` (None: every word) that occur in `caption` as whole words."""
    w = words(caption)
    grams = {" ".join(w[i : i + n]) for n in range(1, max_words + 1) for i in range(len(w) - n + 1)}
    return grams if vocabulary is None else grams & vocabulary


def count_concepts(captions: Iterable[str], vocabulary: set[str] | None) -> dict[str, int]:
    """c_e: how many captions match each entry (a caption counts once per entry)."""
    n = max((len(e.split()) for e in vocabulary), default=1) if vocabulary is not None else 1
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(match(caption, vocabulary, n))
    return dict(counts)


def shard_captions(shards: list[str], caption_key: str) -> Iterable[str]:
    """Every sample's caption in `shards` (one pass, images never read nor decoded)."""
    from mmcl.data.reader import read_samples

    counter = SkipCounter()
    select = lambda name: name.endswith((".txt", ".json"))  # noqa: E731  (no images, never a pickle)
    for raw in read_samples(shards, counter, select=select):
        try:
            yield decode_caption(raw, decode_json(raw), caption_key, random.Random(raw["__key__"]))
        except SkipSample:
            continue


def save_counts(path: str | Path, counts: dict[str, int]) -> None:
    """Write the counts as JSON atomically (a temporary file renamed over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(counts.items())), f)
    os.replace(tmp, path)


def load_counts(path: str | Path) -> dict[str, int]:
    try:
        counts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"data.balance.counts {path}: not a JSON file of concept counts ({e})") from None
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        raise UserError(f"data.balance.counts {path}: expected {{entry: count}} with integer counts")
    return counts


def keep_probability(entries: Iterable[str], counts: dict[str, int], t: float) -> float:
    """MetaCLIP's p(E) = 1 - prod_e (1 - min(1, t / c_e)); 0 for no entries."""
    drop = 1.0
    for e in entries:
        drop *= 1.0 - min(1.0, t / max(counts.get(e, 1), 1))
    return 1.0 - drop


class BalancedDecoder:
    """Wraps a sample decoder: drops each sample with 1 - p(E) of its caption's entries before decoding it.

    The draw is a hash of (seed, key), not the sample's RNG, so kept samples decode exactly as without
    balancing. Picklable.
    """

    def __init__(
        self, decoder: Any, counts: dict[str, int], t: float, vocabulary: set[str] | None, caption_key: str, seed: int
    ) -> None:
        self.decoder, self.counts, self.t, self.vocabulary = decoder, counts, t, vocabulary
        self.caption_key, self.seed = caption_key, seed
        self.max_words = max((len(e.split()) for e in vocabulary), default=1) if vocabulary is not None else 1

    def keep(self, key: str, caption: str) -> bool:
        p = keep_probability(match(caption, self.vocabulary, self.max_words), self.counts, self.t)
        return _uniforms(f"balance/{key}", self.seed, 1)[0] < p

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        caption = decode_caption(raw, decode_json(raw), self.caption_key, random.Random(raw["__key__"]))
        if not self.keep(raw["__key__"], caption):
            raise SkipSample("balanced")
        return self.decoder(raw, rng)


def balanced(decoder: Any, cfg: Any, shards: list[str], seed: int) -> BalancedDecoder:
    """`decoder` behind MetaCLIP's filter for `cfg` (a DataConfig with `balance`): counts read from
    `balance.counts` when that file exists, else counted over `shards` once and saved there (when set)."""
    b = cfg.balance
    vocabulary = load_vocabulary(b.vocabulary) if b.vocabulary else None
    if b.counts and Path(b.counts).exists():
        counts = load_counts(b.counts)
    else:
        counts = count_concepts(shard_captions(shards, cfg.caption_key), vocabulary)
        if b.counts:
            save_counts(b.counts, counts)
    return BalancedDecoder(decoder, counts, b.t, vocabulary, cfg.caption_key, seed)
