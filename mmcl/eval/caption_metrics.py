"""Captioning metrics over a whole split: BLEU-1..4, ROUGE-L, CIDEr-D. Plain Python, no Java.

Each scorer reproduces the coco-caption code (`pycocoevalcap` `Bleu`, `Rouge`, `Cider`) number for
number on the same tokens; only the tokenizer differs. coco-caption runs the Stanford PTB tokenizer
(Java); here `tokenize` is a documented regex so scores need no JVM:

    lowercase, then keep runs of letters/digits, allowing ' or - inside a word
    ("A dog's T-shirt, red!" -> ["a", "dog's", "t-shirt", "red"]); all other punctuation is dropped.

PTB splits clitics ("dog's" -> "dog 's", "can't" -> "ca n't") and keeps some punctuation-bearing
tokens whole, so scores are close to, not digit-for-digit equal with, numbers published with PTB.

- BLEU (Papineni et al. 2002): corpus-level, clipped n-gram precisions summed over the split,
  geometric mean up to n, brevity penalty from the reference length closest to each candidate
  (ties -> shorter), coco-caption's 1e-15 / 1e-9 smoothing.
- ROUGE-L (Lin 2004): per image, LCS precision and recall maximised over the references, then
  F_beta with beta = 1.2; averaged over images.
- CIDEr-D (Vedantam et al. 2015): TF-IDF n-gram vectors (n = 1..4) with document frequencies over
  the references of the whole split, candidate counts clipped to the reference's, Gaussian length
  penalty (sigma = 6), averaged over n and references, x 10. (coco-caption measures the length
  difference in bigrams, the same number as in words whenever both captions are non-empty, and
  an empty caption scores 0 either way.)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable

_TOKEN = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")

NGram = tuple[str, ...]


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens with punctuation stripped (see the module docstring)."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int = 4) -> Counter[NGram]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(candidates: list[list[str]], references: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (coco-caption `BleuScorer.compute_score(option='closest')`)."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        max_ref: dict[NGram, int] = {}
        for ref in refs:
            for gram, c in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        tl = len(cand)
        test_len += tl
        ref_len += min((abs(len(r) - tl), len(r)) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, tl - k)
        for gram, c in _ngrams(cand, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L of one candidate (coco-caption `Rouge.calc_score`)."""
    if not candidate:
        return 0.0
    prec = rec = 0.0
    for ref in refs:
        lcs = _lcs(ref, candidate)
        prec = max(prec, lcs / len(candidate))
        rec = max(rec, lcs / len(ref) if ref else 0.0)
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta**2) * prec * rec / (rec + beta**2 * prec)


def cider_d(
    candidates: list[list[str]], references: list[list[list[str]]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D (coco-caption `CiderScorer`); the corpus score is their mean."""
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: Counter[NGram] = Counter()
    for refs in ref_counts:
        df.update({g for r in refs for g in r})
    log_n = math.log(float(len(references)))

    def vec(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        v: list[dict[NGram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            w = float(tf) * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
            v[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 1)  # words
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, refs in zip(candidates, ref_counts):
        vh, nh, lh = vec(_ngrams(cand, n))
        total = [0.0] * n
        for ref in refs:
            vr, nr, lr = vec(ref)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


def caption_scores(
    predictions: dict[Hashable, str], references: dict[Hashable, list[str]], per_image: bool = False
) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of predicted captions against references, over the whole split.

    Args:
        predictions: image id -> predicted caption.
        references: image id -> reference captions (at least one); same ids as `predictions`.
        per_image: also return `per_image` (id -> {'rouge_l', 'cider_d'}).

    Returns:
        `bleu1`..`bleu4`, `rouge_l`, `cider_d` (coco-caption scale: CIDEr-D x 10, others in [0, 1]), `n_images`.
    """
    missing = set(references) ^ set(predictions)
    if missing:
        raise ValueError(f"predictions and references differ in {len(missing)} ids, e.g. {next(iter(missing))!r}")
    if not references:
        raise ValueError("caption_scores got no images")
    ids = list(references)
    cands = [tokenize(predictions[i]) for i in ids]
    refs = []
    for i in ids:
        if not references[i]:
            raise ValueError(f"image {i!r} has no reference caption")
        refs.append([tokenize(r) for r in references[i]])
    b = bleu(cands, refs)
    rouge = [rouge_l(c, r) for c, r in zip(cands, refs)]
    cider = cider_d(cands, refs)
    out: dict = {f"bleu{k + 1}": b[k] for k in range(4)}
    out.update(rouge_l=sum(rouge) / len(rouge), cider_d=sum(cider) / len(cider), n_images=len(ids))
    if per_image:
        out["per_image"] = {i: {"rouge_l": r, "cider_d": c} for i, r, c in zip(ids, rouge, cider)}
    return out
