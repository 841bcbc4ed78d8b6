"""DINO: self-distillation with no labels, a student matching an EMA teacher's centred, sharpened output.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO). Two strong views
x1, x2 of each image; the student is the image tower f and a head g (an MLP to a bottleneck, L2-normalised,
then a weight-normalised linear layer to K outputs); the teacher f', g' an exponential moving average of
them. With c the centre (K,), t_s the student and t_t the teacher temperature:

    s_v = g(f(x_v)) / t_s                          (n, K) student logits, v = 1, 2
    q_v = softmax((g'(f'(x_v)) - c) / t_t)         (n, K) teacher targets, no gradient
    L   = 1/2 [ H(q1, s2) + H(q2, s1) ],   H(q, s) = -1/n sum_i sum_k q_ik log softmax(s_i)_k

After each optimizer step (`on_step_end`):

    c  <- 0.9 c + 0.1 mean of the teacher outputs g'(f'(x_v)) over the step's rows of every process
    theta' <- m theta' + (1 - m) theta,   m = 1 - (1 - m0) (cos(pi k / K_m) + 1) / 2 (cosine to 1 over
          `momentum_steps` steps k; 0 = constant m0)

and t_t warms up linearly from `warmup_teacher_temp` to `teacher_temp` over `teacher_temp_warmup_steps`.
Centring stops one output from dominating, sharpening stops the uniform one: the term logs the entropy of
the teacher targets (`teacher_entropy`, in nats; log K = uniform collapse, 0 = one-hot collapse).

Multi-crop (`local_crops` N > 0, `mmcl.data.multicrop`): the N small local views l_1..l_N (n, 3, s, s)
go to the student only; every teacher target is matched by every other view of the student:

    L = 1 / (2 (N + 1)) sum_{v in {1, 2}} [ H(q_v, s_{3-v}) + sum_j H(q_v, s_{l_j}) ]

(N = 0 is the two-view loss above). Global views then crop `global_scale` of the image, local ones
`local_scale` at `local_size` px.

A per-sample loss: gradient accumulation averages micro-batches, and the centre is a per-step statistic
read from `ctx.features` (the step's teacher outputs of every micro-batch, `step_features`). Heads use LayerNorm, not
BatchNorm, so accumulation stays exact (`heads.mlp`). Teacher, centre and step counter are task state:
checkpointed and restored exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig
from mmcl.data.batch import Batch
from mmcl.data.multicrop import enable_dynamic_size, local_names, multicrop_views
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.heads import mlp
from mmcl.registry import LOSSES


@dataclass
class DINOOptions:
    out_dim: int = 1024  # K (the paper: 65536)
    hidden: int = 512  # the paper: 2048
    bottleneck: int = 64  # the paper: 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # the paper: 0.04 (0.07 for longer runs)
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 0  # the paper: 30 epochs
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA m0
    momentum_steps: int = 0  # cosine schedule of m to 1 over this many steps (0 = constant m0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    local_crops: int = 0  # N small views for the student (the paper: 8 at 96 px of 224)
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.4)
    global_scale: tuple[float, float] = (0.4, 1.0)  # the global views' crop when local_crops > 0


class DINOHead(nn.Module):
    """(B, D) -> (B, K): MLP to a bottleneck, L2 normalisation, a weight-normalised linear layer (norm 1)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden, bottleneck, 3)
        self.last = nn.Parameter(torch.randn(out_dim, bottleneck) * bottleneck**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.last, dim=-1).T


@LOSSES.register("dino")
class DINOTerm(LossTerm):
    """Student-teacher cross-entropy on two strong views. Returns {'loss', 'teacher_entropy', 'teacher_temp'}."""

    Options = DINOOptions
    step_features = ("t1", "t2")  # the teacher outputs: the centre is their mean over the step
    test_setup = {"with": ["clip"], "options": {"out_dim": 64, "hidden": 32, "bottleneck": 16}}

    def __init__(self, model: nn.Module, options: DINOOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        if o.local_crops > 0:  # a ViT takes the small crops at their own size (the model's size unchanged)
            enable_dynamic_size(model.image, o.local_size)
        self.head = DINOHead(model.cfg.embed_dim, o.hidden, o.bottleneck, o.out_dim)
        self.teacher_tower, self.teacher_head = copy.deepcopy(model.image), copy.deepcopy(self.head)
        for p in [*self.teacher_tower.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(o.out_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimizer steps taken: the schedules
        object.__setattr__(self, "_online", model.image)  # not a submodule: the model owns and saves it

    def views(self, model: nn.Module) -> dict[str, Any]:
        o = self.options
        return multicrop_views(model, o.augment, o.local_crops, o.local_size, o.local_scale, o.global_scale)

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = torch.cat([batch.views["view1"], batch.views["view2"]])  # (2n, 3, S, S): one pass for both
        s1, s2 = self.head(model.encode_image(views, normalize=False)).chunk(2)
        with torch.no_grad():
            t1, t2 = self.teacher_head(self.teacher_tower(views)).chunk(2)
        out = {"s1": s1, "s2": s2, "t1": t1, "t2": t2}
        names = local_names(self.options.local_crops)
        if names:  # (N n, 3, s, s) in one pass -> (n, N, K), the student only
            local = self.head(model.encode_image(torch.cat([batch.views[v] for v in names]), normalize=False))
            out["s_local"] = torch.stack(local.chunk(len(names)), dim=1)
        return out

    def teacher_temp(self) -> float:
        o, k = self.options, int(self.steps)
        if k >= o.teacher_temp_warmup_steps:
            return o.teacher_temp
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * k / o.teacher_temp_warmup_steps

    def teacher_momentum(self) -> float:
        o, k = self.options, int(self.steps)
        if o.momentum_steps <= 0:
            return o.momentum
        if k >= o.momentum_steps:
            return 1.0
        return 1.0 - (1.0 - o.momentum) * (math.cos(math.pi * k / o.momentum_steps) + 1) / 2

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        tt, ts = self.teacher_temp(), self.options.student_temp
        q1, q2 = (F.softmax((feats[t].detach() - self.center) / tt, dim=-1) for t in ("t1", "t2"))
        log_s1, log_s2 = (F.log_softmax(feats[s] / ts, dim=-1) for s in ("s1", "s2"))
        loss = -(q1 * log_s2).sum(-1).mean() - (q2 * log_s1).sum(-1).mean()
        pairs = 2
        if "s_local" in feats:  # (n, N, K): each local view against both teacher targets
            log_local = F.log_softmax(feats["s_local"] / ts, dim=-1)
            loss = loss - ((q1 + q2)[:, None] * log_local).sum(-1).sum(1).mean()
            pairs += 2 * log_local.shape[1]
        loss = loss / pairs
        with torch.no_grad():
            q = torch.cat([q1, q2])
            entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy, "teacher_temp": torch.tensor(tt)}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        teacher = ctx.gather(torch.cat([ctx.features["t1"], ctx.features["t2"]]))  # (2 P N, K), every rank
        c = self.options.center_momentum
        self.center.mul_(c).add_(teacher.mean(0).to(self.center.dtype), alpha=1 - c)
        m = self.teacher_momentum()
        for target, online in ((self.teacher_tower, self._online), (self.teacher_head, self.head)):
            for t, o in zip(target.parameters(), online.parameters()):
                t.mul_(m).add_(o.detach(), alpha=1 - m)
            for t, o in zip(target.buffers(), online.buffers()):
                t.copy_(o)
        self.steps += 1
