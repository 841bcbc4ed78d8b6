"""ConSERT's embedding-level text views (Yan et al. 2021) as options of the simcse term: feature cutoff zeroes the
same embedding dimensions of every token of a caption, the adversarial view is the clean one moved by epsilon along
the SimCSE loss's gradient, and SimCSE trains with each (the loss falls)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.losses.base import StepContext
from mmcl.losses.nt_xent import info_nce
from mmcl.models import build_model
from mmcl.tasks import build_task

CAPTIONS = [f"a {c} {s} at the {p}" for c in ("red", "green", "blue", "white") for s in ("circle", "square")
            for p in ("top", "bottom")]  # fmt: skip


def _task(terms: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *extra])
    return build_task(build_model(cfg.model), cfg)


def _batch(task, captions=CAPTIONS) -> Batch:
    ids, mask = task.model.tokenizer(captions)
    return Batch(text=ids, text_mask=mask, captions=list(captions), keys=[f"k{i}" for i in range(len(captions))])


class Inputs:
    """Records what the text tower's blocks receive (token + position embeddings) on each pass."""

    def __init__(self, tower) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = tower.transformer.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach()))


def test_feature_cutoff_zeroes_the_same_dimensions_of_every_token() -> None:
    task = _task("[{name: simcse, feature_cutoff: 0.25}]")
    task.eval()
    term, tower, batch = task.terms["simcse"], task.model.text, _batch(task, CAPTIONS[:4])
    feats = task(batch)
    inputs = Inputs(tower)
    term.features(task.model, batch, feats)
    inputs.handle.remove()
    (x,) = inputs.seen
    n = x.shape[1]
    position = tower.positional_embedding[:n].detach()
    e = x - position  # the token embeddings the tower used
    clean = tower.token_embedding(batch.text[:, :n]).detach()
    mask = term.cutoff_mask(batch.keys, tower.width)
    assert (mask == 0).sum(1).tolist() == [round(0.25 * tower.width)] * 4
    assert not torch.equal(mask[0], mask[1])  # each caption its own dimensions
    for b in range(4):
        dropped = mask[b] == 0
        assert e[b][:, dropped].abs().max() < 1e-6  # those dimensions zero at every token ...
        torch.testing.assert_close(e[b][:, ~dropped], clean[b][:, ~dropped], atol=1e-6, rtol=0)  # ... the rest kept
    assert torch.equal(term.cutoff_mask(["k0"], 64), term.cutoff_mask(["k0"], 64))  # a function of (key, step)
    before = term.cutoff_mask(["k0"], 64)
    task.on_step_end(StepContext(step=1))
    assert int(term.steps) == 1 and not torch.equal(term.cutoff_mask(["k0"], 64), before)  # new draws each step
    assert "terms.simcse.steps" in task.state_for_checkpoint()


def test_the_adversarial_view_is_epsilon_along_the_loss_gradient() -> None:
    eps = 0.05
    task = _task(f"[{{name: simcse, adversarial: {eps}, temperature: 0.1}}]")
    task.eval()  # no dropout: the reference pass below sees the same network
    term, tower, batch = task.terms["simcse"], task.model.text, _batch(task, CAPTIONS[:6])
    feats = task(batch)
    inputs = Inputs(tower)
    out = term.features(task.model, batch, feats)
    inputs.handle.remove()
    clean_x, adv_x = inputs.seen  # the gradient pass, then the view's pass
    r = adv_x - clean_x
    # the reference gradient, through the tower's layers by hand: token embeddings -> blocks -> EOS -> projection
    n = clean_x.shape[1]
    e = tower.token_embedding(batch.text[:, :n]).detach().requires_grad_(True)
    h = tower.ln_final(tower.transformer(e + tower.positional_embedding[:n]))
    eos = batch.text_mask.sum(1) - 1
    y2 = F.normalize(h[torch.arange(6), eos] @ tower.text_projection, dim=-1)
    loss = info_nce(feats["text_features"].detach(), y2, 0.1, symmetric=False)["loss"]
    (g,) = torch.autograd.grad(loss, e)
    for b in range(6):
        assert r[b].norm().item() == pytest.approx(eps, rel=1e-4)  # epsilon per caption
        torch.testing.assert_close(r[b], eps * g[b] / g[b].norm(), atol=1e-6, rtol=1e-4)  # along the gradient
    with torch.no_grad():  # and it is adversarial: the loss is higher on that view than on the clean one
        adv = info_nce(feats["text_features"], out["text2"], 0.1, symmetric=False)["loss"]
    assert adv > loss.detach()
    assert all(p.grad is None for p in task.parameters())  # the gradient pass leaves the parameters alone


def test_the_adversarial_view_runs_in_the_no_grad_cache_pass_of_accumulation() -> None:
    task = _task("[clip, {name: simcse, adversarial: 0.05, feature_cutoff: 0.1}]", "model.text.dropout=0.1")
    size = task.model.preprocess_cfg()["image_size"]
    batch = _batch(task)
    batch.images = torch.randn(len(CAPTIONS), 3, size, size)
    out = task.step(batch.split(2)).metrics
    assert out["simcse_loss"] > 0
    grads = [p.grad for p in task.model.text.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("option", ["feature_cutoff: 0.2", "adversarial: 0.02"])
def test_simcse_trains_with_each_view(option: str) -> None:
    task = _task(f"[{{name: simcse, {option}}}]", "model.text.dropout=0.1")
    task.train()
    batch = _batch(task)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(25):
        out, _ = task.loss(task(batch), batch)
        optimizer.zero_grad()
        out.backward()
        optimizer.step()
        task.on_step_end(StepContext(step=step + 1))
        losses.append(out.item())
    last = sum(losses[-5:]) / 5
    assert last < 0.6 * math.log(len(CAPTIONS)) and last < 0.6 * losses[0], losses  # well below chance and start


@pytest.mark.parametrize("name", ["consert", "consert-adversarial"])
def test_the_shipped_consert_configs_build(name: str) -> None:
    from pathlib import Path

    cfg = load_experiment(Path(__file__).resolve().parents[2] / f"configs/objectives/{name}.yaml", [])
    term = build_task(build_model(cfg.model), cfg).terms["simcse"]
    assert term.embedding_noise
