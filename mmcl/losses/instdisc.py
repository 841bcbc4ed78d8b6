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
m_i <- normalize(mu m_i + (1 - mu) v), mu = 0.5.

Cost and bounds: the bank is N x d entries of `bank_dtype` (fp16 by default: 2 bytes), so 256 MB per million
samples at d = 128 (the paper's size; fp32 512 MB), plus an 8-byte owner fingerprint per slot (8 MB per
million) for the collision count. By default the bank is a buffer of the task, on the accelerator with it.
With `bank_file` it is a numpy memmap (a `.npy` file, one per process: `.rank<r>` appended when there are
several) that stays on the host and on disk (the OS pages it in): each step reads only the rows it uses
(n (K + 1) d) and writes only its own. Either way the bank is task state: the checkpoint (written atomically by
the trainer) carries it, N d bytes more per checkpoint, and a resume restores it exactly (into the file).

Slots are hashes of the keys (`key_slot`): keys beyond the bank size share slots, about N(1 - 1/e) distinct
slots for N keys in N slots, so make the bank larger than the set. Collisions are counted, not silent: each
time a sample's slot last held another sample's entry (`owner`, a fingerprint per slot) is one, reported as
the metric 'collisions' (cumulative; task state). A per-sample term: each sample's loss reads only its own
row and the bank (fixed during a step), so accumulation is plain averaging. The paper estimates Z once from
its first mini-batch; here it is estimated once from pairs of the initial (random unit) bank entries, which
untrained embeddings resemble, so it does not depend on how the first step is cut into micro-batches. Bank,
owners, collisions, Z and step count are task state: checkpointed and restored exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.distributed import world_info
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
    bank_dtype: str = "float16"  # float16 (2 bytes an entry) | float32
    bank_file: str = ""  # a .npy memmap holding the bank on disk, off the accelerator ('' = a task buffer)


_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_CHUNK = 65536  # rows drawn per generator seed: the initial bank is the same in memory and on disk


def key_slot(key: str, size: int) -> int:
    """A sample key's bank slot: stable across processes, runs and Python versions."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % size


def key_fingerprint(key: str) -> int:
    """A nonzero int64 naming the key (another hash than the slot's): who owns a slot, for the collision count."""
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"mmcl-own").digest(), "little")
    return (value - 2**63) or 1


def initial_rows(seed: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """Rows start..stop of the initial bank (random unit vectors, float32), drawn chunk by chunk."""
    parts = []
    for chunk in range(start // _CHUNK, -(-stop // _CHUNK)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        rows = F.normalize(torch.randn(_CHUNK, dim, generator=g), dim=-1)
        lo, hi = max(start - chunk * _CHUNK, 0), min(stop - chunk * _CHUNK, _CHUNK)
        parts.append(rows[lo:hi])
    return torch.cat(parts)


@LOSSES.register("instdisc")
class InstDiscTerm(LossTerm):
    """Instance discrimination with a memory bank. Returns {'loss', 'pos_sim' (mean v.m_i)}."""

    Options = InstDiscOptions
    inputs = ("images",)
    step_features = ("v", "slot", "owner")  # the step's rows, their slots and keys: the bank update
    test_setup = {"with": ["clip"], "options": {"bank_size": 64, "dim": 16, "negatives": 8}}

    def __init__(self, model: nn.Module, options: InstDiscOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        if o.loss not in ("nce", "softmax"):
            raise UserError(f"loss.terms instdisc: loss must be 'nce' or 'softmax', got {o.loss!r}")
        if o.bank_dtype not in _DTYPES:
            raise UserError(f"loss.terms instdisc: bank_dtype must be one of {list(_DTYPES)}, got {o.bank_dtype!r}")
        self.head = mlp(model.cfg.embed_dim, model.cfg.embed_dim, o.dim, o.head_layers)
        self.memmap: np.memmap | None = None  # with bank_file: the file, opened at first use (the rank known)
        if not o.bank_file:
            self.register_buffer("bank", self._initial_bank())
        sample = initial_rows(o.seed, 0, min(1024, o.bank_size), o.dim)  # NCE's Z from distinct initial entries
        sample = sample.to(_DTYPES[o.bank_dtype]).float()
        sims = torch.exp(sample @ sample.T / o.temperature)
        mean = (sims.sum() - sims.diagonal().sum()) / max(sample.shape[0] * (sample.shape[0] - 1), 1)
        self.register_buffer("z", (mean * o.bank_size).double())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("owner", torch.zeros(o.bank_size, dtype=torch.long))  # key fingerprints, 0 = empty
        self.register_buffer("collisions", torch.zeros((), dtype=torch.long))
        if o.bank_file:  # the bank travels with the checkpoint, not as a buffer (never moved to the accelerator)
            self.register_state_dict_post_hook(_save_file_bank)
            self.register_load_state_dict_pre_hook(_load_file_bank)

    def _initial_bank(self) -> torch.Tensor:
        o = self.options
        return initial_rows(o.seed, 0, o.bank_size, o.dim).to(_DTYPES[o.bank_dtype])

    def table(self) -> torch.Tensor:
        """The bank (N, d): the task's buffer, or (with `bank_file`) the memmap as a CPU tensor."""
        if not self.options.bank_file:
            return self.bank
        if self.memmap is None:
            o = self.options
            rank, world = world_info()
            path = Path(o.bank_file + (f".rank{rank}" if world > 1 else ""))
            path.parent.mkdir(parents=True, exist_ok=True)
            dtype = np.float16 if o.bank_dtype == "float16" else np.float32
            self.memmap = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(o.bank_size, o.dim))
            for start in range(0, o.bank_size, _CHUNK):  # a fresh bank (a resume overwrites it with the saved one)
                stop = min(start + _CHUNK, o.bank_size)
                self.memmap[start:stop] = initial_rows(o.seed, start, stop, o.dim).numpy()
        return torch.from_numpy(self.memmap)

    def rows(self, slots: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Bank rows at `slots` (any shape), as `like`'s dtype and device: only those rows move."""
        table = self.table()
        return table[slots.to(table.device)].to(device=like.device, dtype=like.dtype)

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not batch.keys:
            raise UserError("the instdisc loss term needs sample keys in the batch (the memory bank's address)")
        x = feats["image_features"] if "image_features" in feats else model.encode_image(batch.images)
        v = F.normalize(self.head(x), dim=-1)
        slots = torch.tensor([key_slot(k, self.options.bank_size) for k in batch.keys], device=v.device)
        owner = torch.tensor([key_fingerprint(k) for k in batch.keys], device=v.device)
        return {"v": v, "slot": slots, "owner": owner, "negatives": self.draw(batch.keys).to(v.device)}

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
        pos = self.rows(feats["slot"], v)  # (n, d)
        neg = self.rows(feats["negatives"], v)  # (n, K, d)
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
        return {
            "loss": loss.mean(),
            "pos_sim": (s_pos * o.temperature).mean().detach(),
            "collisions": self.collisions.detach().to(v.dtype),
        }

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        v, slots = ctx.gather(ctx.features["v"]), ctx.gather(ctx.features["slot"])  # every rank's rows
        owners = ctx.gather(ctx.features["owner"])
        held = dict(zip(slots.tolist(), self.owner[slots.to(self.owner.device)].tolist()))  # one read, then Python
        last, collisions = {}, 0
        for i, (s, key) in enumerate(zip(slots.tolist(), owners.tolist())):
            collisions += held[s] != 0 and held[s] != key  # the slot held another sample's entry: now shared
            held[s], last[s] = key, i  # a slot twice in a step: the later row wins
        self.owner[torch.tensor(list(last), device=self.owner.device)] = torch.tensor(
            [held[s] for s in last], device=self.owner.device
        )
        self.collisions += collisions
        table = self.table()
        idx = torch.tensor(list(last), device=table.device)
        rows = v[torch.tensor(list(last.values()), device=v.device)].float().to(table.device)
        mu = self.options.momentum
        table[idx] = F.normalize(mu * table[idx].float() + (1 - mu) * rows, dim=-1).to(table.dtype)
        self.steps += 1


def _save_file_bank(module: InstDiscTerm, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the file-backed bank as the state's `bank` (the memmap's pages, not a copy)."""
    state[prefix + "bank"] = module.table()


def _load_file_bank(module: InstDiscTerm, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: a saved `bank` is written into the file (a resume), the entry consumed."""
    saved = state.pop(prefix + "bank", None)
    if saved is not None:
        table = module.table()
        if saved.shape != table.shape:
            raise UserError(f"loss.terms instdisc: the checkpoint's bank is {tuple(saved.shape)}, the term's "
                            f"{tuple(table.shape)} (bank_size, dim)")  # fmt: skip
        table.copy_(saved.to(table.dtype))
        module.memmap.flush()
