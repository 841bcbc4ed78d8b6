"""SwAV: swapped prediction of cluster codes between two views, codes from Sinkhorn-Knopp equipartition.

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV).
Two strong views x1, x2 of each image; a projector g to unit vectors, K prototypes C (a learned layer,
rows kept at unit norm), codes from the Sinkhorn-Knopp algorithm over the scores of the whole batch
(every process's rows, and a queue of past embeddings once it is full):

    z_v = normalize(g(f(x_v)))                         (n, D)
    p_v = z_v @ C^T                                    (n, K) scores
    Q_v = sinkhorn([queue_v @ C^T; p_v of all ranks])  codes of this rank's rows, no gradient
    sinkhorn(S): Q = exp(S / eps)^T (K, B), Q /= sum Q; 3 times { rows /= row sums, /= K;
                 columns /= column sums, /= B }; return (B * Q)^T    (each row sums to 1, clusters equal)
    L   = 1/2 [ H(Q_1, p_2 / t) + H(Q_2, p_1 / t) ],  H(q, s) = -1/n sum_i sum_k q_ik log softmax(s_i)_k

with the paper's eps = 0.05, 3 iterations, t = 0.1. Multi-crop (`local_crops` N > 0, `mmcl.data.multicrop`):
codes come from the two global views only, predictions from every view, N small local ones l_j included:

    L = 1 / (2 (N + 1)) sum_{v in {1, 2}} [ H(Q_v, p_{3-v} / t) + sum_j H(Q_v, p_{l_j} / t) ]

(N = 0 is the loss above); global views then crop `global_scale` of the image, local ones `local_scale`
at `local_size` px. The prototypes get no gradient for the first
`freeze_prototypes_steps` optimizer steps (the paper: its first epoch, 313 iterations) and are
re-normalised after each step (`on_step_end`), when the step's embeddings of every process also enter the
queues (one per view; the paper adds a queue when the batch is smaller than K, e.g. 3840 rows).

A batch term (the codes see the whole batch): the scores are features (rows, computed with gradient in
`features`), so gradient accumulation caches them and stays exact. Queues, prototypes and the step count
are task state: checkpointed and restored exactly. Heads use LayerNorm (`heads.mlp`), not BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig
from mmcl.data.batch import Batch
from mmcl.data.multicrop import enable_dynamic_size, local_names, multicrop_views
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.losses.heads import mlp
from mmcl.losses.queue import FeatureQueue
from mmcl.registry import LOSSES


@dataclass
class SwAVOptions:
    prototypes: int = 256  # K (the paper: 3000)
    proj_hidden: int = 512  # the paper: 2048
    proj_out: int = 128
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    queue_size: int = 0  # past embeddings per view added to the codes' batch (0 = none)
    freeze_prototypes_steps: int = 0  # the paper: 313
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    local_crops: int = 0  # N small views, predicted but never coded (the paper: 6 at 96 px of 224)
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.4)
    global_scale: tuple[float, float] = (0.4, 1.0)  # the global views' crop when local_crops > 0


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp codes of (B, K) scores -> (B, K), each row a distribution, the K clusters equally used."""
    q = torch.exp((scores.double() - scores.max()) / epsilon).T  # (K, B); the shift cancels in the normalisation
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T.to(scores.dtype)


@LOSSES.register("swav")
class SwAVTerm(LossTerm):
    """Swapped prediction of Sinkhorn codes. Returns {'loss', 'code_entropy' (mean over rows, nats), 'queue'}."""

    Options = SwAVOptions
    batch_features = ("p1", "p2")
    step_features = ("z1", "z2")  # the step's embeddings: into the queues
    test_setup = {"with": ["clip"], "options": {"prototypes": 16, "proj_hidden": 32, "proj_out": 16, "queue_size": 16}}

    def __init__(self, model: nn.Module, options: SwAVOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        if o.local_crops > 0:  # a ViT takes the small crops at their own size (the model's size unchanged)
            enable_dynamic_size(model.image, o.local_size)
        self.projector = mlp(model.cfg.embed_dim, o.proj_hidden, o.proj_out, 2)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(o.prototypes, o.proj_out), dim=-1))
        self.queues = nn.ModuleList([FeatureQueue(max(o.queue_size, 1), o.proj_out) for _ in range(2)])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if o.local_crops > 0:  # the local scores are rows of the batch too
            self.batch_features = ("p1", "p2", "p_local")

    def views(self, model: nn.Module) -> dict[str, Any]:
        o = self.options
        return multicrop_views(model, o.augment, o.local_crops, o.local_size, o.local_scale, o.global_scale)

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = torch.cat([batch.views["view1"], batch.views["view2"]])  # (2n, 3, S, S): one pass for both
        z = F.normalize(self.projector(model.encode_image(views, normalize=False)), dim=-1)
        frozen = int(self.steps) < self.options.freeze_prototypes_steps
        p1, p2 = (z @ (self.prototypes.detach() if frozen else self.prototypes).T).chunk(2)
        z1, z2 = z.detach().chunk(2)
        out = {"p1": p1, "p2": p2, "z1": z1, "z2": z2}
        names = local_names(self.options.local_crops)
        if names:  # (N n, 3, s, s) in one pass -> scores (n, N, K)
            local = torch.cat([batch.views[v] for v in names])
            zl = F.normalize(self.projector(model.encode_image(local, normalize=False)), dim=-1)
            pl = zl @ (self.prototypes.detach() if frozen else self.prototypes).T
            out["p_local"] = torch.stack(pl.chunk(len(names)), dim=1)
        return out

    def codes(self, p: torch.Tensor, queue: FeatureQueue) -> torch.Tensor:
        """Codes of this rank's rows `p` (n, K), from the scores of every rank and the (full) queue."""
        rank, world = world_info()
        n = p.shape[0]
        scores = all_gather_cat(p.detach(), with_grad=False)  # (P*n, K), rank order
        if self.options.queue_size > 0 and int(queue.filled) == queue.feats.shape[0]:
            scores = torch.cat([queue.feats @ self.prototypes.detach().T, scores])  # the queue's rows first
        own = scores.shape[0] - world * n + rank * n
        return sinkhorn(scores, self.options.epsilon, self.options.sinkhorn_iters)[own : own + n]

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        t = self.options.temperature
        q1, q2 = self.codes(feats["p1"], self.queues[0]), self.codes(feats["p2"], self.queues[1])
        loss12 = -(q1 * F.log_softmax(feats["p2"] / t, dim=-1)).sum(-1).mean()
        loss21 = -(q2 * F.log_softmax(feats["p1"] / t, dim=-1)).sum(-1).mean()
        loss, pairs = loss12 + loss21, 2
        if "p_local" in feats:  # (n, N, K): each local view predicts both global codes
            log_local = F.log_softmax(feats["p_local"] / t, dim=-1)
            loss = loss - ((q1 + q2)[:, None] * log_local).sum(-1).sum(1).mean()
            pairs += 2 * log_local.shape[1]
        with torch.no_grad():
            q = torch.cat([q1, q2])
            entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss / pairs, "code_entropy": entropy, "queue": self.queues[0].filled.float()}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        if self.options.queue_size > 0:
            for queue, z in zip(self.queues, (ctx.features["z1"], ctx.features["z2"])):
                queue.push(ctx.gather(z))
        self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
        self.steps += 1
