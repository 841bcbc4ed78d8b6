"""Task = a model + its weighted loss terms (`mmcl.losses`, registry LOSSES), and the optimizer step's
forward and backward.

    loss = sum_t  weight_t * L_t(features)

`forward(batch)` runs the model on the batch entries the terms take (plus each term's own
features: second views, heads) and returns features; `loss(feats, batch)` applies the terms
and their weights. The training loop calls neither: it calls `step(micro_batches)` and gets the
step's metrics and the features the terms' `on_step_end` reads (`StepOutput`). Everything the
task owns besides the model (heads, queues, momentum encoders, counters: the terms' parameters
and buffers) is optimized and checkpointed with it.

The step keeps every negative over k micro-batches. Plain gradient accumulation (sum of micro-batch
gradients) is exact for per-sample losses but loses negatives for contrastive ones: each micro-batch
would only see its own. Here, as in GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") and open_clip's `accum_freq`, driven by the feature names the terms
declare (`LossTerm.batch_features`):

  pass 1  embed every micro-batch without gradients (batch terms' features only) and cache them;
  pass 2  recompute micro-batch j with gradients, put its rows into the cached set, and
          back-propagate  sum_batch_terms w * L(full batch)  +  sum_sample_terms w * s_j * L(j)

(s_j = micro-batch j's share of a per-sample term's items, `LossTerm.count`: 1/k for equal
micro-batches, its share of the target tokens for a token-mean captioning loss).

Summed over j this is exactly the full-batch gradient: each cached row gets its gradient once
(when it is recomputed), shared 0-dim features (temperature, bias) only in the last pass, and
per-sample terms their full-batch mean. Dropout is replayed with the RNG state of pass 1, so
recomputed features equal the cached ones. Reported metrics: batch terms' full-batch values
(from the last pass), per-sample terms' share-weighted means over micro-batches. The step's
features every term's `on_step_end` reads (its `batch_features` and `step_features`: the rows of
all micro-batches, detached, whatever the term's accumulation mode) are returned with the metrics
(queues of keys, feature banks, a per-sample term's centre).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
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
        self._view_alias: dict[str, str] | None = None  # `term/view` -> the identical view another term owns
        for name, term in self.terms.items():
            missing = [i for i in term.inputs if i not in self._model_inputs]
            if missing:
                raise UserError(
                    f"loss term '{name}' needs a model that takes {missing}; {type(model).__name__} takes "
                    f"{sorted(self._model_inputs)}"
                )

    # ------------------------------------------------------------------ names: each term's own

    def views(self) -> dict[str, Any]:
        """The named inputs every term needs from the loader (`mmcl.data.views`), under `term/name`:
        a sample view's output is stored under its key, a batch view's outputs under the term's name.

        Identical views are built once: the k-th view of a term with a given `spec` (`ImageView.spec`: the
        transform and its settings) is the k-th view of that spec of the first term asking for it, and is
        handed to both (`scoped_batch`); e.g. dino and swav with the same augmentation share their two views.
        """
        views: dict[str, Any] = {}
        owners: dict[tuple, str] = {}
        self._view_alias = {}
        for name, term in self.terms.items():
            seen: dict[Any, int] = {}
            for view, builder in term.views(self.model).items():
                spec = getattr(builder, "spec", None) if builder.kind == "sample" else None
                if spec is not None:
                    k = seen[spec] = seen.get(spec, -1) + 1
                    owner = owners.setdefault((spec, k), f"{name}/{view}")
                    if owner != f"{name}/{view}":
                        self._view_alias[f"{name}/{view}"] = owner
                        continue
                views[f"{name}/{view}"] = builder if builder.kind == "sample" else ScopedBatchView(name, builder)
        return views

    def scoped_batch(self, name: str, batch: Batch) -> Batch:
        """`batch` as term `name` sees it: its own views by their plain names (shared ones included)."""
        if self._view_alias is None:
            self.views()
        shared = {a: batch.views[o] for a, o in self._view_alias.items() if a not in batch.views and o in batch.views}
        store = {**batch.views, **shared} if shared else batch.views
        return replace(batch, views=TermScope(name, "view", store, {}))

    def scoped_features(self, name: str, feats: Mapping[str, torch.Tensor]) -> TermScope:
        """`feats` as term `name` sees it: its own features and the model's, by plain name."""
        return TermScope(name, "feature", feats, {k: v for k, v in feats.items() if "/" not in k})

    @property
    def has_batch_terms(self) -> bool:
        return any(t.batch_features for t in self.terms.values())

    def batch_feature_keys(self, feats: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys (in `feats`) of the features whose loss sees the whole batch: what gradient accumulation caches."""
        return list(dict.fromkeys(self._key(n, f, feats) for n, t in self.terms.items() for f in t.batch_features))

    def step_feature_rows(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The (detached) features of `feats` any term's `on_step_end` reads (`batch_features`, `step_features`)."""
        keys = [self._key(n, f, feats) for n, t in self.terms.items() for f in (*t.batch_features, *t.step_features)]
        return {k: feats[k].detach() for k in dict.fromkeys(keys) if k in feats}

    @staticmethod
    def join_step_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Micro-batches' `step_feature_rows` -> the step's rows (0-dim values: the last micro-batch's)."""
        return {k: v if v.dim() == 0 else torch.cat([p[k] for p in parts]) for k, v in parts[-1].items()}

    @staticmethod
    def _key(term: str, name: str, feats: Mapping[str, torch.Tensor]) -> str:
        own = f"{term}/{name}"
        return own if own in feats or name not in feats else name

    def is_batch_term(self, name: str) -> bool:
        return bool(self.terms[name].batch_features)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The task's own parameters and buffers (everything but the model's)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    # ------------------------------------------------------------------ step, forward, loss, step end

    def step(
        self, micro_batches: list[Batch], accelerator: Any = None, prepared: nn.Module | None = None
    ) -> StepOutput:
        """Forward and backward of one optimizer step over its k micro-batches, every in-batch negative kept (see
        the module docstring); the caller clips, steps the optimizer, then calls `on_step_end` with the returned
        features.

        Args:
            micro_batches: the step's micro-batches (k = train.grad_accum).
            accelerator: an `accelerate.Accelerator` (device, autocast, DDP `no_sync`, backward), or None
                for a plain single-process step on the task's device.
            prepared: this task as prepared by the accelerator (DDP-wrapped); defaults to the task.
        """
        prepared = prepared if prepared is not None else self
        device = accelerator.device if accelerator is not None else next(self.parameters()).device
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
                return self.loss(*args, **kwargs)

        shares = self.shares(micro_batches)
        per_pass: list[dict[str, dict[str, torch.Tensor]]] = []
        step_rows: list[dict[str, torch.Tensor]] = []
        if k == 1 or not self.has_batch_terms:  # nothing spans micro-batches: plain accumulation
            for j, mb in enumerate(micro_batches):
                feats = run(mb, last=j == k - 1)
                loss, outputs = objective(feats, mb, shares=shares[j])
                backward(loss)
                per_pass.append(outputs)
                step_rows.append(self.step_feature_rows(feats))
            return StepOutput(self._combine(per_pass, shares), self.join_step_rows(step_rows))

        states, cached = [], []
        with torch.no_grad():
            for mb in micro_batches:
                states.append(RngReplay(device))
                feats = run(mb, last=False, batch_only=True)
                names = self.batch_feature_keys(feats)
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
            step_rows.append(self.step_feature_rows(own))  # recomputed rows equal the cached ones
        after.restore()
        return StepOutput(self._combine(per_pass, shares), self.join_step_rows(step_rows))

    def _combine(
        self, per_pass: list[dict[str, dict[str, torch.Tensor]]], shares: list[dict[str, float]]
    ) -> dict[str, float]:
        """Batch terms: the last pass (full batch); per-sample terms: the share-weighted mean over micro-batches."""
        outputs: dict[str, dict[str, float]] = {}
        for name in per_pass[-1]:
            if self.is_batch_term(name):
                outputs[name] = {m: float(v) for m, v in per_pass[-1][name].items()}
            else:
                outputs[name] = {
                    m: sum(float(p[name][m]) * s[name] for p, s in zip(per_pass, shares)) for m in per_pass[-1][name]
                }
        return self.metrics(outputs)

    def forward(self, batch: Batch, batch_only: bool = False) -> dict[str, torch.Tensor]:
        """Features of `batch` for every term (or, with `batch_only`, for the batch terms only): the model's
        outputs by their names, each term's own features as `term/name`."""
        terms = {n: t for n, t in self.terms.items() if t.batch_features or not batch_only}
        names = [n for n in self._model_inputs if any(n in t.inputs for t in terms.values())]
        inputs = {n: self._input(n, terms, batch) for n in names}
        absent = [n for n in names if inputs[n] is None and n not in ("text_mask", "text_only", "images")]
        if absent:
            raise UserError(
                f"the batch has no {absent} for the loss terms {list(self.terms)} (keys {batch.keys[:2]}...)"
            )
        feats = dict(self.model(**inputs)) if inputs else {}  # image-image terms may need views only
        model = SharedPasses(self.model)  # one image-tower pass for terms encoding the same views
        for name, term in terms.items():
            extra = term.features(model, self.scoped_batch(name, batch), self.scoped_features(name, feats))
            feats.update({f"{name}/{k}": v for k, v in extra.items()})
        return feats

    @staticmethod
    def _input(name: str, terms: dict[str, LossTerm], batch: Batch) -> Any:
        """A model input: a batch field, or the view of that name of a term that takes it."""
        if name in _BATCH_FIELDS:
            return getattr(batch, name)
        for term_name, term in terms.items():
            if name in term.inputs and f"{term_name}/{name}" in batch.views:
                return batch.views[f"{term_name}/{name}"]
        return None

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
            out = term(
                self.scoped_features(name, feats if term.batch_features else own), self.scoped_batch(name, batch)
            )
            share = 1.0 if term.batch_features else (shares or {}).get(name, 1.0)
            total = total + self.weights[name] * share * out["loss"]
            outputs[name] = {m: v.detach() for m, v in out.items()}
        return total, outputs  # type: ignore[return-value]

    def shares(self, micro_batches: list[Batch]) -> list[dict[str, float]]:
        """Each micro-batch's share of every per-sample term (its `count` over the step's total)."""
        counts = {
            n: [t.count(self.scoped_batch(n, mb)) for mb in micro_batches]
            for n, t in self.terms.items()
            if not t.batch_features
        }
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
        """After each optimizer step: every term's `on_step_end` (EMA targets, queue pushes), each seeing its
        own step features (`ctx.features`: the step's rows, `step_feature_rows`) by plain name."""
        for name, term in self.terms.items():
            term.on_step_end(replace(ctx, features=self.scoped_features(name, ctx.features)))


@dataclass
class StepOutput:
    """What `Task.step` returns.

    metrics:  the step's flat metrics (`Task.metrics`: 'loss', '<term>_loss', the terms' other scalars)
    features: the step's features every term's `on_step_end` reads (`Task.step_feature_rows` of every
              micro-batch, joined), by their keys in the task's features (`term/name` or the model's name)
    """

    metrics: dict[str, float]
    features: dict[str, torch.Tensor] = field(default_factory=dict)


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


class SharedPasses:
    """The model as the terms' `features` see it in one forward: `encode_image` of images some term already
    encoded (equal values, e.g. the same shared views) returns that pass's features (and graph) instead of
    running the tower again. Everything else is the model's."""

    def __init__(self, model: nn.Module) -> None:
        self._model, self._passes = model, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = next((o for x, o in self._passes if _same(x, images)), None)
        if out is None:
            out = self._model.encode_image(images, normalize=False)
            self._passes.append((images, out))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _autocast(accelerator: Any):
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class TermKeyError(UserError, KeyError):
    """A term asked for a feature or view it does not have (a KeyError, so `Mapping.get` still works)."""

    def __str__(self) -> str:
        return str(self.args[0])


class TermScope(Mapping):
    """Term `term`'s names in a flat store: its own `term/name` entries, then `shared` (the model's outputs).
    A missing name is a one-line `TermKeyError` naming the term and what it has."""

    def __init__(self, term: str, what: str, store: Mapping[str, Any], shared: Mapping[str, Any]) -> None:
        self.term, self.what, self.store, self.shared = term, what, store, shared
        self.prefix = f"{term}/"

    def __getitem__(self, name: str) -> Any:
        own = self.prefix + name
        if own in self.store:
            return self.store[own]
        if name in self.shared:
            return self.shared[name]
        raise TermKeyError(f"loss term '{self.term}' has no {self.what} '{name}'; it has {sorted(self)}")

    def __iter__(self) -> Iterator[str]:
        own = [k[len(self.prefix) :] for k in self.store if k.startswith(self.prefix)]
        return iter(dict.fromkeys([*own, *self.shared]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ScopedBatchView:
    """A term's batch view (`mmcl.data.views`) whose outputs are stored under the term's name. Picklable."""

    kind = "batch"

    def __init__(self, term: str, view: Any) -> None:
        self.term, self.view = term, view

    def __call__(self, captions: list[str], keys: list[str] | None, has_images: bool = True) -> dict[str, Any]:
        return {f"{self.term}/{k}": v for k, v in self.view(captions, keys, has_images).items()}


_BATCH_FIELDS = {f.name for f in fields(Batch) if f.name != "views"}


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
    built = []
    for s in specs:
        term_cls = LOSSES.get(s.name)
        built.append((s.name, s.weight, term_cls(model, _own_options(term_cls, s.options))))
    return Task(model, built)


def _own_options(term_cls: type, options: Any) -> Any:
    """`options` as an instance of the term's own `Options` class: the config holds the registry's copy of
    the dataclass (read from the term file without importing it, `mmcl.registry`), with the same fields."""
    real = getattr(term_cls, "Options", None)
    if options is None or real is None or isinstance(options, real) or not dataclasses.is_dataclass(options):
        return options
    return real(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init})
