import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmcl.eval.caption_metrics import caption_scores, tokenize

VOCAB = [
    "a",
    "the",
    "dog",
    "cat",
    "man",
    "woman",
    "red",
    "blue",
    "sits",
    "runs",
    "on",
    "in",
    "grass",
    "park",
    "ball",
    "with",
    "of",
    "street",
]


def _corpus(seed, n=40):
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 12)))

    refs = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(n)}
    preds = {i: (rng.choice(refs[i]) if rng.random() < 0.2 else sentence()) for i in range(n)}
    preds[0] = "dog"
    preds[1], refs[1] = "?!", ["cat", "a cat"]  # empty after tokenizing
    return preds, refs


def coco_scores(preds, refs):
    """pycocoevalcap's Python scorers on the same tokens (its PTB tokenizer needs Java, so it is skipped)."""
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in refs.items()}
    res = {i: [" ".join(tokenize(p))] for i, p in preds.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, per_image = Cider().compute_score(gts, res)
    return bleu, rouge, cider, per_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap(seed):
    preds, refs = _corpus(seed)
    ours = caption_scores(preds, refs, per_image=True)
    bleu, rouge, cider, per_image = coco_scores(preds, refs)
    for k in range(4):
        assert ours[f"bleu{k + 1}"] == pytest.approx(bleu[k], abs=1e-9)
    assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-9)
    assert ours["cider_d"] == pytest.approx(cider, abs=1e-9)
    assert [ours["per_image"][i]["cider_d"] for i in preds] == pytest.approx(list(per_image), abs=1e-9)
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider_d"] > 0


def test_matches_pycocoevalcap_on_real_looking_captions():
    refs = {
        "a": ["A dog runs on the grass.", "A brown dog running through a field!", "dog on grass"],
        "b": ["Two men play football in the park.", "Men playing soccer, outdoors."],
        "c": ["A red bus on a city street.", "A double-decker bus drives down the street."],
    }
    preds = {"a": "a dog runs on the grass", "b": "a man plays with a ball", "c": "a red bus on the street"}
    ours = caption_scores(preds, refs)
    bleu, rouge, cider, _ = coco_scores(preds, refs)
    assert ours["bleu4"] == pytest.approx(bleu[3], abs=1e-9)
    assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-9)
    assert ours["cider_d"] == pytest.approx(cider, abs=1e-9)


def test_tokenizer():
    assert tokenize("A dog's T-shirt, red!  ...and  2 cats.") == ["a", "dog's", "t-shirt", "red", "and", "2", "cats"]
    assert tokenize("--!") == []


def test_exact_match_scores_one_and_errors():
    refs = {1: ["a cat on a mat"], 2: ["the dog in the park"]}
    out = caption_scores({1: "A cat on a mat.", 2: "the dog in the park"}, refs)
    assert out["bleu4"] == pytest.approx(1.0) and out["rouge_l"] == pytest.approx(1.0)
    assert out["n_images"] == 2
    with pytest.raises(ValueError, match="differ in 1 ids"):
        caption_scores({1: "x"}, refs)
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({1: "x"}, {1: []})
