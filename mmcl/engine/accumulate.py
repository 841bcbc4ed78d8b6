"""One optimizer step's forward and backward over k micro-batches, keeping every negative.

Plain gradient accumulation (sum of micro-batch gradients) is exact for per-sample losses but
loses negatives for contrastive ones: each micro-batch would only see its own. Here, as in
GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") and open_clip's `accum_freq`, driven by the feature names the task's terms declare
(`LossTerm.batch_features`):

  pass 1  embed every micro-batch without gradients (batch terms' features only) and cache them;
  pass 2  recompute micro-batch j with gradients, put its rows into the cached set, and
          back-propagate  sum_batch_terms w * L(full batch)  +  sum_sample_terms w * s_j * L(j)

(s_j = micro-batch j's share of a per-sample term's items, `LossTerm.count`: 1/k for equal
micro-batches, its share of the target tokens for a token-mean captioning loss).

Summed over j this is exactly the full-batch gradient: each cached row gets its gradient once
(when it is recomputed), shared 0-dim features (temperature, bias) only in the last pass, and
per-sample terms their full-batch mean. Dropout is replayed with the RNG state of pass 1, so
recomputed features equal the cached ones. Reported metrics: batch terms' full-batch values
(from the last pass), per-sample terms' share-weighted means over micro-batches.

The step's features every term's `on_step_end` reads (its `batch_features` and `step_features`: the rows
of all micro-batches, detached, whatever the term's accumulation mode) are left in `task.step_features`
(queues of keys, feature banks, a per-sample term's centre).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from mmcl.data.batch import Batch


class RngReplay:
    """Records the CPU (and current accelerator) RNG state so a forward pass can be replayed exactly
    (same dropout masks), as GradCache does."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def forward_backward(
    task: nn.Module, micro_batches: list[Batch], accelerator: Any = None, prepared: nn.Module | None = None
) -> dict[str, float]:
    """Forward and backward of one optimizer step; returns the step's metrics (see `Task.metrics`).

    Args:
        task: the `Task` (unwrapped).
        micro_batches: the k micro-batches of the step.
        accelerator: an `accelerate.Accelerator` (device, autocast, DDP `no_sync`, backward), or None
            for a plain single-process run on the task's device.
        prepared: the task as prepared by the accelerator (DDP-wrapped); defaults to `task`.
    """
    prepared = prepared if prepared is not None else task
    device = accelerator.device if accelerator is not None else next(task.parameters()).device
    k = len(micro_batches)

    def run(batch: Batch, last: bool, **kwargs: Any) -> dict[str, torch.Tensor]:
        sync = accelerator.no_sync(prepared) if accelerator is not None and not last else contextlib.nullcontext()
        with sync, _autocast(accelerator):
            return prepared(batch.to(device), **kwargs)

    def backward(loss: torch.Tensor) -> None:
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()

    def objective(*args: Any, **kwargs: Any):
        with _autocast(accelerator):
            return task.loss(*args, **kwargs)

    shares = task.shares(micro_batches)
    per_pass: list[dict[str, dict[str, torch.Tensor]]] = []
    step_rows: list[dict[str, torch.Tensor]] = []
    if k == 1 or not task.has_batch_terms:  # nothing spans micro-batches: plain accumulation
        for j, mb in enumerate(micro_batches):
            feats = run(mb, last=j == k - 1)
            loss, outputs = objective(feats, mb, shares=shares[j])
            backward(loss)
            per_pass.append(outputs)
            step_rows.append(task.step_feature_rows(feats))
        task.step_features = task.join_step_rows(step_rows)
        return _combine(task, per_pass, shares)

    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(RngReplay(device))
            feats = run(mb, last=False, batch_only=True)
            names = task.batch_feature_keys(feats)
            cached.append({n: feats[n] for n in names})
    after = RngReplay(device)
    for j, mb in enumerate(micro_batches):
        last = j == k - 1
        states[j].restore()
        own = run(mb, last=last)
        full = dict(own)
        for n in names:
            full[n] = torch.cat([own[n] if i == j else c[n] for i, c in enumerate(cached)])
        if not last:  # shared scalars: their gradient is counted once, not k times
            full = {n: v.detach() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for n, v in full.items()}
        loss, outputs = objective(full, mb, own=own, shares=shares[j])
        backward(loss)
        per_pass.append(outputs)
        step_rows.append(task.step_feature_rows(own))  # recomputed rows equal the cached ones
    after.restore()
    task.step_features = task.join_step_rows(step_rows)
    return _combine(task, per_pass, shares)


def _combine(
    task: nn.Module, per_pass: list[dict[str, dict[str, torch.Tensor]]], shares: list[dict[str, float]]
) -> dict[str, float]:
    """Batch terms: the last pass (full batch); per-sample terms: the share-weighted mean over micro-batches."""
    outputs: dict[str, dict[str, float]] = {}
    for name in per_pass[-1]:
        if task.is_batch_term(name):
            outputs[name] = {m: float(v) for m, v in per_pass[-1][name].items()}
        else:
            outputs[name] = {
                m: sum(float(p[name][m]) * s[name] for p, s in zip(per_pass, shares)) for m in per_pass[-1][name]
            }
    return task.metrics(outputs)


def _autocast(accelerator: Any):
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
