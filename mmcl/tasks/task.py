"""Task = a model + its weighted loss terms (`mmcl.losses`, registry LOSSES).

    loss = sum_t  weight_t * L_t(features)

`forward(batch)` runs the model on the batch entries the terms take (plus each term's own
features: second views, heads) and returns features; `loss(feats, batch)` applies the terms
and their weights. The training loop never calls either directly: the accumulator
(`mmcl/engine/accumulate.py`) does, so gradient accumulation keeps every in-batch negative of
every term. Everything the task owns besides the model (heads, queues, momentum encoders,
counters: the terms' parameters and buffers) is optimized and checkpointed with it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mmcl.config import ExperimentConfig, LossConfig, TermConfig
from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm, StepContext
from mmcl.registry import LOSSES
from mmcl.utils import UserError


class Task(nn.Module):
    """`model` trained with `terms`, a list of (name, weight, LossTerm).

    Batch terms (those declaring `batch_features`: in-batch negatives) come first in every forward,
    so the features a gradient-accumulation cache pass computes are the same ones, drawn with the
    same random numbers, as in the full pass.
    """

    def __init__(self, model: nn.Module, terms: list[tuple[str, float, LossTerm]]) -> None:
        super().__init__()
        if not terms:
            raise UserError("the task has no loss terms: set loss.terms (e.g. [clip])")
        self.model = model
        ordered = sorted(terms, key=lambda t: not t[2].batch_features)  # stable: batch terms first
        self.terms = nn.ModuleDict({name: term for name, _, term in ordered})
        self.weights = {name: weight for name, weight, _ in ordered}
        self._model_inputs = _forward_params(model)
        self.step_features: dict[str, torch.Tensor] = {}  # the last step's batch features (set by the accumulator)
        for name, term in self.terms.items():
            missing = [i for i in term.inputs if i not in self._model_inputs]
            if missing:
                raise UserError(
                    f"loss term '{name}' needs a model that takes {missing}; {type(model).__name__} takes "
                    f"{sorted(self._model_inputs)}"
                )

    # ------------------------------------------------------------------ what the loader and the accumulator read

    def views(self) -> dict[str, Any]:
        """The named inputs every term needs from the loader (`mmcl.data.views`)."""
        views: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for name, term in self.terms.items():
            for view, builder in term.views(self.model).items():
                if view in views:
                    raise UserError(
                        f"loss terms '{owner[view]}' and '{name}' both ask the loader for a view named '{view}'"
                    )
                views[view], owner[view] = builder, name
        return views

    @property
    def batch_feature_names(self) -> list[str]:
        """Features whose loss sees the whole batch: what gradient accumulation caches."""
        return list(dict.fromkeys(f for t in self.terms.values() for f in t.batch_features))

    def is_batch_term(self, name: str) -> bool:
        return bool(self.terms[name].batch_features)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The task's own parameters and buffers (everything but the model's)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    # ------------------------------------------------------------------ forward, loss, step end

    def forward(self, batch: Batch, batch_only: bool = False) -> dict[str, torch.Tensor]:
        """Features of `batch` for every term (or, with `batch_only`, for the batch terms only)."""
        terms = [t for t in self.terms.values() if t.batch_features or not batch_only]
        names = [n for n in self._model_inputs if any(n in t.inputs for t in terms)]
        inputs = {n: batch.get(n) for n in names}
        absent = [n for n in names if inputs[n] is None and n not in ("text_mask", "text_only", "images")]
        if absent:
            raise UserError(
                f"the batch has no {absent} for the loss terms {list(self.terms)} (keys {batch.keys[:2]}...)"
            )
        feats = dict(self.model(**inputs)) if inputs else {}  # image-image terms may need views only
        for term in terms:
            extra = term.features(self.model, batch, feats)
            clash = sorted(set(extra) & set(feats))
            if clash:  # two terms writing one name would silently train one of them on the other's features
                raise UserError(
                    f"loss term {type(term).__name__} returns features {clash} that another term or the model already made"
                )
            feats.update(extra)
        return feats

    def loss(
        self,
        feats: dict[str, torch.Tensor],
        batch: Batch,
        own: dict[str, torch.Tensor] | None = None,
        shares: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """The weighted objective and each term's (unweighted) outputs.

        Args:
            feats: features; a batch term's rows span the whole batch.
            own: this micro-batch's own features for per-sample terms (default: `feats`).
            shares: per-sample term -> this micro-batch's share of the step (default 1).

        Returns:
            (weighted sum to back-propagate, {term name: {'loss': value, other metrics}}).
        """
        own = feats if own is None else own
        total: torch.Tensor | float = 0.0
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        for name, term in self.terms.items():
            out = term(feats if term.batch_features else own, batch)
            share = 1.0 if term.batch_features else (shares or {}).get(name, 1.0)
            total = total + self.weights[name] * share * out["loss"]
            outputs[name] = {m: v.detach() for m, v in out.items()}
        return total, outputs  # type: ignore[return-value]

    def shares(self, micro_batches: list[Batch]) -> list[dict[str, float]]:
        """Each micro-batch's share of every per-sample term (its `count` over the step's total)."""
        counts = {n: [t.count(mb) for mb in micro_batches] for n, t in self.terms.items() if not t.batch_features}
        return [{n: c[j] / max(sum(c), 1e-12) for n, c in counts.items()} for j in range(len(micro_batches))]

    def metrics(self, outputs: dict[str, dict[str, float]]) -> dict[str, float]:
        """Flat metrics: 'loss' (the weighted objective), '<term>_loss' per term, the terms' other scalars
        (prefixed by the term's name where two terms report the same one)."""
        flat = {"loss": sum(self.weights[n] * out["loss"] for n, out in outputs.items())}
        seen = [m for out in outputs.values() for m in out if m != "loss"]
        for name, out in outputs.items():
            flat[f"{name}_loss"] = out["loss"]
            for m, v in out.items():
                if m != "loss":
                    flat[m if seen.count(m) == 1 else f"{name}_{m}"] = v
        return flat

    def on_step_end(self, ctx: StepContext) -> None:
        """After each optimizer step: every term's `on_step_end` (EMA targets, queue pushes)."""
        for term in self.terms.values():
            term.on_step_end(ctx)


def _forward_params(model: nn.Module) -> list[str]:
    """Names the model's forward takes, in its signature's order (the order its towers run)."""
    return [p for p in inspect.signature(model.forward).parameters if p not in ("self", "args", "kwargs")]


def build_task(model: nn.Module, cfg: ExperimentConfig | LossConfig) -> Task:
    """`model` + the terms of `cfg.loss` (empty: the model's `default_terms`)."""
    loss = cfg.loss if isinstance(cfg, ExperimentConfig) else cfg
    specs = list(loss.terms)
    if not specs:
        defaults = getattr(model, "default_terms", ())
        if not defaults:
            raise UserError(f"{type(model).__name__} has no default loss terms: set loss.terms")
        specs = [TermConfig.from_config(name, "loss.terms") for name in defaults]
    return Task(model, [(s.name, s.weight, LOSSES.get(s.name)(model, s.options)) for s in specs])
