"""InstDisc: instance discrimination against a memory bank with one entry per training sample.

Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination".
Each image is its own class; its class vector is its entry in a memory bank M (N, d), addressed by the
sample's key (`batch.keys`, hashed to a slot: the same slot on every process and after a resume). With
v = normalize(head(f(x))) (n, d), i the sample's slot, and K entries j_1..j_K drawn per sample (uniformly,
from a generator seeded by its key and the step, so accumulation and resume draw the same):

    softmax (non-parametric):  L_i = -log exp(v.m_i / t) / (exp(v.m_i / t) + sum_k exp(v.m_jk / t))
    nce:  P(j|v) = exp(v.m_j / t) / Z,  h(j) = P(j|v) / (P(j|v) + K / N)
          L_i = -log h(i) - sum_k log(1 - h(j_k))       Z = N * mean exp(m_a.m_b / t), fixed at the start
    proximal:  L_i += lambda * ||v - m_i||^2             (the paper's section 3.4, lambda = 30; 0 = off)

After each optimizer step (`on_step_end`) the step's rows of every process update their entries:
m_i <- normalize(mu m_i + (1 - mu) v), mu = 0.5. The bank is fp16: N x d x 2 bytes, 256 MB per million
samples at d = 128 (the paper's size); `bank_size` bounds it (slots are hashes: keys beyond the bank size
share slots, about N(1 - e^{-1}) distinct slots for N keys in N slots, so make the bank larger than the set).
A per-sample term: each sample's loss reads only its own row and the bank (fixed during a step), so
accumulation is plain averaging. The paper estimates Z once from its first mini-batch; here it is estimated
once from pairs of the initial (random unit) bank entries, which untrained embeddings resemble, so it does not
depend on how the first step is cut into micro-batches. Bank, Z and step count are task state: checkpointed and restored exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.heads import mlp
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class InstDiscOptions:
    bank_size: int = 65536  # slots N (keep it above the number of training samples)
    dim: int = 128  # d, the paper's
    negatives: int = 4096  # K, the paper's
    temperature: float = 0.07
    loss: str = "nce"  # nce | softmax
    momentum: float = 0.5  # of the bank entries
    proximal: float = 30.0  # lambda (0 = no proximal term)
    head_layers: int = 1  # the paper: a linear layer
    seed: int = 0


def key_slot(key: str, size: int) -> int:
    """A sample key's bank slot: stable across processes, runs and Python versions."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % size


@LOSSES.register("instdisc")
class InstDiscTerm(LossTerm):
    """Instance discrimination with a memory bank. Returns {'loss', 'pos_sim' (mean v.m_i)}."""

    Options = InstDiscOptions
    inputs = ("images",)
    step_features = ("v", "slot")  # the step's rows and their slots: the bank update
    test_setup = {"with": ["clip"], "options": {"bank_size": 64, "dim": 16, "negatives": 8}}

    def __init__(self, model: nn.Module, options: InstDiscOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        if o.loss not in ("nce", "softmax"):
            raise UserError(f"loss.terms instdisc: loss must be 'nce' or 'softmax', got {o.loss!r}")
        self.head = mlp(model.cfg.embed_dim, model.cfg.embed_dim, o.dim, o.head_layers)
        g = torch.Generator().manual_seed(o.seed)
        self.register_buffer("bank", F.normalize(torch.randn(o.bank_size, o.dim, generator=g), dim=-1).half())
        sample = self.bank[:1024].float()  # NCE's normaliser Z from pairs of distinct initial entries
        sims = torch.exp(sample @ sample.T / o.temperature)
        mean = (sims.sum() - sims.diagonal().sum()) / max(sample.shape[0] * (sample.shape[0] - 1), 1)
        self.register_buffer("z", (mean * o.bank_size).double())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not batch.keys:
            raise UserError("the instdisc loss term needs sample keys in the batch (the memory bank's address)")
        x = feats["image_features"] if "image_features" in feats else model.encode_image(batch.images)
        v = F.normalize(self.head(x), dim=-1)
        slots = torch.tensor([key_slot(k, self.options.bank_size) for k in batch.keys], device=v.device)
        return {"v": v, "slot": slots, "negatives": self.draw(batch.keys).to(v.device)}

    def draw(self, keys: list[str]) -> torch.Tensor:
        """(n, K) negative slots, a pure function of (seed, step, key)."""
        o, step = self.options, int(self.steps)
        rows = []
        for key in keys:
            seed = int.from_bytes(hashlib.blake2b(f"{o.seed}/{step}/{key}".encode(), digest_size=8).digest(), "little")
            rows.append(torch.randint(o.bank_size, (o.negatives,), generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        o = self.options
        v = feats["v"]
        bank = self.bank.to(v.dtype)
        pos = bank[feats["slot"]]  # (n, d)
        neg = bank[feats["negatives"]]  # (n, K, d)
        s_pos = (v * pos).sum(-1) / o.temperature  # (n,)
        s_neg = torch.einsum("nd,nkd->nk", v, neg) / o.temperature  # (n, K)
        if o.loss == "softmax":
            loss = torch.logsumexp(torch.cat([s_pos[:, None], s_neg], 1), 1) - s_pos
        else:
            z = self.z.to(v.dtype)
            ratio = o.negatives / o.bank_size  # K * P_n(j), the noise distribution uniform
            p_pos, p_neg = torch.exp(s_pos) / z, torch.exp(s_neg) / z
            loss = -torch.log(p_pos / (p_pos + ratio)) - torch.log(ratio / (p_neg + ratio)).sum(1)
        if o.proximal > 0:
            loss = loss + o.proximal * (v - pos).pow(2).sum(-1)
        return {"loss": loss.mean(), "pos_sim": (s_pos * o.temperature).mean().detach()}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        v, slots = ctx.gather(ctx.features["v"]), ctx.gather(ctx.features["slot"])  # every rank's rows
        last = {int(s): i for i, s in enumerate(slots.tolist())}  # a slot twice in a step: the later row wins
        idx = torch.tensor(list(last), device=v.device)
        rows = v[torch.tensor(list(last.values()), device=v.device)]
        mu = self.options.momentum
        self.bank[idx] = F.normalize(mu * self.bank[idx].float() + (1 - mu) * rows.float(), dim=-1).half()
        self.steps += 1
