"""Winoground's text, image and group scores on counterfactual image pairs (Thrush et al. 2022).

A group is two images and their two captions that differ by one edit: (I0, C0) a sample of the built-in
generator and (I1, C1) its counterfactual (`mmcl.data.counterfactual`). With s = cosine similarity:

    text score   s(I0, C0) > s(I0, C1)  and  s(I1, C1) > s(I1, C0)     each image picks its own caption
    image score  s(I0, C0) > s(I1, C0)  and  s(I1, C1) > s(I0, C1)     each caption picks its own image
    group score  both                                                   (chance: 25%, 25%, 16.7%)
    pair         s(I0, C0) > s(I0, C1)                                  the caption-vs-negative accuracy of
                                                                        `mmcl eval compositional` (chance 50%)

Reported per edit (subset) and as the mean over subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from mmcl.eval.runner import EncodeImages, EncodeTexts, encode_all_texts

if TYPE_CHECKING:
    from mmcl.inference import Encoder

CHANCE = {"pair": 0.5, "text": 0.25, "image": 0.25, "group": 1 / 6}


@dataclass
class Group:
    """Two images and their captions, one edit apart."""

    subset: str
    images: tuple[Image.Image, Image.Image]
    captions: tuple[str, str]
    key: str = ""


def counterfactual_groups(
    n: int, split: str = "test", seed: int = 0, image_size: int = 64, subsets: list[str] | None = None
) -> list[Group]:
    """Groups from the first `n` samples of the built-in generator's `split`: one per applicable edit."""
    from mmcl.data.counterfactual import EDITS, counterfactual
    from mmcl.data.synthetic import generate

    wanted = list(subsets or EDITS)
    groups = []
    for i in range(n):
        original = generate(i, seed, image_size, split)
        for subset in wanted:
            cf = counterfactual(i, subset, seed, image_size, split)
            if cf is not None:
                groups.append(Group(subset, (original.image, cf.image), (original.caption, cf.caption), f"{i:09d}"))
    return groups


@torch.no_grad()
def run_group_scores(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    groups: list[Group],
    batch_size: int = 64,
    text_batch_size: int = 256,
) -> dict:
    """Text, image, group and pair accuracies per subset (see the module docstring).

    Returns:
        `task`='group_scores', `metrics` ({subset}_{pair,text,image,group}, mean_{...}, n_groups), `chance`,
        `per_group` (subset, key, the 2x2 similarity matrix rows = images, columns = captions).
    """
    if not groups:
        raise ValueError("no counterfactual groups to score")
    images = [im for g in groups for im in g.images]
    img = torch.cat(
        [encode_images(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    )
    txt = encode_all_texts(encode_texts, [c for g in groups for c in g.captions], text_batch_size)
    img, txt = F.normalize(img, dim=-1).view(len(groups), 2, -1), F.normalize(txt, dim=-1).view(len(groups), 2, -1)
    sim = img @ txt.transpose(1, 2)  # (G, 2 images, 2 captions)
    right = {
        "pair": sim[:, 0, 0] > sim[:, 0, 1],
        "text": (sim[:, 0, 0] > sim[:, 0, 1]) & (sim[:, 1, 1] > sim[:, 1, 0]),
        "image": (sim[:, 0, 0] > sim[:, 1, 0]) & (sim[:, 1, 1] > sim[:, 0, 1]),
    }
    right["group"] = right["text"] & right["image"]
    metrics: dict[str, float | int] = {}
    subsets = list(dict.fromkeys(g.subset for g in groups))
    for subset in subsets:
        mask = torch.tensor([g.subset == subset for g in groups])
        for score, ok in right.items():
            metrics[f"{subset}_{score}"] = ok[mask].float().mean().item()
    for score in right:
        metrics[f"mean_{score}"] = sum(metrics[f"{s}_{score}"] for s in subsets) / len(subsets)
    metrics["n_groups"] = len(groups)
    per_group = [{"subset": g.subset, "key": g.key, "sim": s.tolist()} for g, s in zip(groups, sim)]
    return {"task": "group_scores", "metrics": metrics, "chance": CHANCE, "per_group": per_group}


def evaluate_group_scores(encoder: Encoder, groups: list[Group], **kw) -> dict:
    """`run_group_scores` with an `mmcl.inference.Encoder`."""
    return run_group_scores(encoder.encode_images, encoder.encode_texts, groups, **kw)


def group_table(results: dict) -> str:
    """Markdown: one row per subset, pair / text / image / group accuracy in %, chance in the header."""
    m = results["metrics"]
    subsets = [k[: -len("_group")] for k in m if k.endswith("_group")]
    head = "| subset | pair (50%) | text (25%) | image (25%) | group (16.7%) |\n|---|---|---|---|---|\n"
    rows = [
        f"| {s} | " + " | ".join(f"{100 * m[f'{s}_{k}']:.1f}" for k in ("pair", "text", "image", "group")) + " |"
        for s in subsets
    ]
    return head + "\n".join(rows) + f"\n\n{m['n_groups']} groups (an image and its counterfactual, their captions).\n"
