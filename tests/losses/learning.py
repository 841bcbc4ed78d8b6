"""The harness of the learning tests: seconds of training of a tiny CLIP on the built-in shapes through the real
task, views and step, and the probes that read what the model learnt (test_objective_learning.py,
test_family_learning.py)."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.synthetic import COLOURS, SyntheticSample, generate
from mmcl.data.transforms import transform_from_model
from mmcl.losses.base import StepContext
from mmcl.models import build_model
from mmcl.tasks import Task, build_task

N_TRAIN, N_VAL, STEPS, BATCH = 2000, 300, 60, 64
N_PROBE = 1000
OBJECTIVES = Path(__file__).resolve().parents[2] / "configs" / "objectives"


@functools.cache
def samples() -> tuple[list[SyntheticSample], list[SyntheticSample]]:
    """`N_TRAIN` training and `N_VAL` held-out 32 px samples of the built-in generator (built once per process)."""
    return [generate(i, image_size=32) for i in range(N_TRAIN)], [
        generate(i, image_size=32, split="val") for i in range(N_VAL)
    ]


def shipped(name: str) -> Path:
    """A shipped config under configs/objectives/: what its users train."""
    return OBJECTIVES / f"{name}.yaml"


def train(
    terms: str | Path,
    data: list,
    seed: int = 1,
    steps: int = STEPS,
    caption: Callable[[SyntheticSample], str] = lambda s: s.caption,
    overrides: Sequence[str] = (),
) -> Task:
    """`steps` steps of batch `BATCH` through the real task, views and accumulator, as the loader builds them.

    `terms`: a `loss.terms` override on clip-tiny, or a config file (its model and terms as shipped);
    `caption` gives a sample's training caption; `overrides` are dotted config overrides (e.g. text dropout).
    """
    torch.manual_seed(seed)
    if isinstance(terms, Path):
        cfg = load_experiment(terms, list(overrides))
    else:
        cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *overrides])
    task = build_task(build_model(cfg.model), cfg)
    tf = transform_from_model(task.model, train=False)
    images = torch.stack([tf(s.image) for s in data])
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3, weight_decay=0.1)
    views, g = task.views(), torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(data), (BATCH,), generator=g).tolist()
        captions, keys = [caption(data[i]) for i in idx], [str(i) for i in idx]
        batch = Batch(images=images[idx], captions=captions, keys=keys)
        batch.text, batch.text_mask = task.model.tokenizer(captions)
        add_views(batch, views, [data[i] for i in idx], random.Random(f"{seed}/{step}"))
        opt.zero_grad()
        out = task.step([batch])
        opt.step()
        task.on_step_end(StepContext(step + 1, features=out.features))
    return task.eval()


def fresh_head(make_term: Callable, model: torch.nn.Module, data: list, batch_of: Callable, seed: int):
    """A term's head (`make_term()`, built after seeding) trained `STEPS` steps of `BATCH` on `model`'s frozen
    towers: what the term's own objective reads from a tower it did not train. `batch_of(term, samples, keys)`
    makes the batch."""
    torch.manual_seed(seed)
    term = make_term()
    model.requires_grad_(False)
    opt = torch.optim.AdamW(term.parameters(), lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randint(len(data), (BATCH,), generator=g).tolist()
        batch = batch_of(term, [data[i] for i in idx], [str(i) for i in idx])
        opt.zero_grad()
        term(term.features(model, batch, {}), batch)["loss"].backward()
        opt.step()
    return term.eval()


def add_views(batch: Batch, views: dict, data: list, rng: random.Random) -> None:
    """The task's `views` of the batch's samples `data`, as the loader builds them. One RNG per sample, drawn
    from by each view in turn as the loader's decoder does, so two views of an image differ (a fresh RNG per
    view made view1 == view2, and every two-view term trivial)."""
    rngs = [random.Random(rng.random()) for _ in data]
    for name, view in views.items():
        if view.kind == "sample":
            batch.views[name] = torch.stack([view(s.image, r) for s, r in zip(data, rngs)])
        else:
            batch.views.update(view(batch.captions, batch.keys, True))


_COLOUR_WORD = re.compile(r"\b(?:" + "|".join(COLOURS) + r") ")


def without_colour(sample: SyntheticSample) -> str:
    """The caption with its colour words dropped ("a large red circle at the top" -> "a large circle at the top")."""
    return _COLOUR_WORD.sub("", sample.caption)


@torch.no_grad()
def probe_accuracy(task: Task, fit: list, val: list, attribute: str) -> float:
    """Held-out accuracy of a logistic-regression probe for `attribute` on the frozen image embedding."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tf = transform_from_model(task.model, train=False)

    def embed(samples: list) -> np.ndarray:
        return task.model.encode_image(torch.stack([tf(s.image) for s in samples]), normalize=False).numpy()

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(embed(fit), [s.attributes[attribute] for s in fit])
    return probe.score(embed(val), [s.attributes[attribute] for s in val])


@torch.no_grad()
def mean_caption_cosine(task: Task, val: list) -> float:
    """Mean cosine between the text embeddings of two different held-out captions (1 = all on one point)."""
    emb = task.model.encode_text(*task.model.tokenizer([s.caption for s in val]))  # (n, D), unit length
    sim = emb @ emb.T  # (n, n)
    return sim[~torch.eye(len(val), dtype=torch.bool)].mean().item()
