"""FILIP: contrastive loss on token-wise late interaction instead of one pooled vector per side.

Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training". A pooled embedding has
to squeeze "a red square left of a blue circle" into one vector; FILIP scores a pair by matching every
image token to its most similar caption token and back, so a colour word can align with the patch
that holds the colour. With x_i^k (k = 1..N) the normalised image tokens of image i
(`CLIP.encode_image_tokens`), y_j^r (r = 1..L_j) the normalised non-padding caption tokens of caption j
(`CLIP.encode_text_tokens`) and t = exp(logit_scale) the model's temperature:

    s_i2t(i, j) = 1/N   sum_k  max_r <x_i^k, y_j^r>        image i's tokens find their caption token
    s_t2i(i, j) = 1/L_j sum_r  max_k <x_i^k, y_j^r>        caption j's tokens find their image token
    L = 1/2 * [ 1/B sum_i CE(t * s_i2t(i, .), i)  +  1/B sum_j CE(t * s_t2i(., j), j) ]

Across P processes the tokens and masks are gathered (with gradient) and each rank scores its own rows
against every rank's columns, labels offset by rank * n (as `ClipLoss(local_loss=True)`): DDP's average
is the full-batch loss. FILIP gathers fewer tokens to save communication; here `image_tokens` keeps a
random subset of k tokens per image in training (the same k for every image, drawn in the forward, so
gradient accumulation replays the draw). Caption tokens are the tower's real tokens up to the EOS, without
a causal tower's BOS (its state is the same for every caption).

Memory: the (n, P*n, N, L) token similarities are materialised with their gradient, n*P*n*N*L floats (toy
towers: 64*64*16*32 = 2M; ViT-B/16 at 224 px with 256 rows per device out of 1024 and 77 tokens: 4G, too many):
at that scale keep fewer image tokens (`image_tokens`) or compute the columns in chunks.

Beside `clip` (`loss.terms: [clip, filip]`) it adds the fine-grained term to the pooled one, sharing the
temperature; alone it trains the towers' tokens only (zero-shot eval and retrieval still read the pooled
features, which then train only through what the towers share).

Shapes: image_tokens (n, N, D), text_tokens (n, L, D) normalised (zero at padding), text_token_mask (n, L)
bool; logit_scale (). Returns {'loss', 'acc_i2t', 'acc_t2i', 'logit_scale'}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.registry import LOSSES
from mmcl.utils import UserError


def token_similarity(
    x: torch.Tensor, y: torch.Tensor, all_x: torch.Tensor, all_y: torch.Tensor, all_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's late interaction between this rank's rows and the global batch's columns.

    Args:
        x: (n, N, D) this rank's image tokens; y: (n, L, D) this rank's caption tokens.
        all_x: (m, N, D) every image's tokens; all_y: (m, L, D) every caption's, real where all_mask (m, L).

    Returns:
        s_i2t (n, m): mean over x_i's tokens of the max over caption j's real tokens; and t_max (n, m, L):
        for each of caption i's tokens, the max over image j's tokens (`s_t2i` is its mean over caption i's
        real tokens, which the caller takes with its own mask).
    """
    sim = torch.einsum("ikd,jrd->ijkr", x, all_y)  # (n, m, N, L)
    s_i2t = sim.masked_fill(~all_mask[None, :, None, :], float("-inf")).amax(-1).mean(-1)  # (n, m)
    t_max = torch.einsum("ird,jkd->ijrk", y, all_x).amax(-1)  # (n, m, L)
    return s_i2t, t_max


@dataclass
class FILIPOptions:
    image_tokens: int = 0  # in training keep a random subset of this many image tokens per image (0: all of them)


@LOSSES.register("filip")
class FILIPTerm(LossTerm):
    """FILIP's token-wise late-interaction InfoNCE (see the module docstring). Needs a model with
    `encode_image_tokens` / `encode_text_tokens` (`mmcl.models.clip.CLIP` on timm/hybrid image towers and
    clip/hf text towers). Its tokens come from a second pass through the towers (the pooled pass is the
    model's forward, which terms beside it read)."""

    Options = FILIPOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_tokens", "text_tokens", "text_token_mask")

    def __init__(self, model: nn.Module, options: FILIPOptions | None = None) -> None:
        super().__init__(model, options)
        if self.options.image_tokens < 0:
            raise UserError(
                f"loss term 'filip': image_tokens must be >= 0 (0 keeps all), got {self.options.image_tokens}"
            )

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = model.encode_image_tokens(batch.images)  # (n, N, D)
        k = self.options.image_tokens
        if self.training and 0 < k < x.shape[1]:  # FILIP's token reduction: a random k per image
            keep = torch.rand(x.shape[:2], device=x.device).argsort(dim=1)[:, :k]  # (n, k)
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[2]))
        y, mask = model.encode_text_tokens(batch.text, batch.text_mask)  # (n, L, D), (n, L)
        return {"image_tokens": x, "text_tokens": y, "text_token_mask": mask}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rank, _ = world_info()
        x, y, mask, t = feats["image_tokens"], feats["text_tokens"], feats["text_token_mask"], feats["logit_scale"]
        n, k, d = x.shape
        # one differentiable gather of both sides, sliced: the gradient reaching the gather is then contiguous.
        # Gathering x and y apart, the einsums hand torch.distributed.nn's all_gather non-contiguous gradients,
        # which its gloo backward (scatters into `empty_like` buffers) mixes up: wrong gradients, right loss.
        both = all_gather_cat(torch.cat([x.flatten(1), y.flatten(1)], dim=1))  # (P*n, N*D + L*D)
        all_x, all_y = both[:, : k * d].view(-1, k, d), both[:, k * d :].view(-1, y.shape[1], d)
        all_mask = all_gather_cat(mask, with_grad=False)
        length = int(all_mask.any(0).nonzero().max()) + 1  # the global batch's longest caption: the rest is padding
        y, mask, all_y, all_mask = y[:, :length], mask[:, :length], all_y[:, :length], all_mask[:, :length]
        s_i2t, t_max = token_similarity(x, y, all_x, all_y, all_mask)  # (n, P*n), (n, P*n, L)
        m = mask.to(t_max.dtype)  # the rows' captions: s_t2i(j, i) for this rank's caption j against image i
        s_t2i = (t_max * m[:, None, :]).sum(-1) / m.sum(-1, keepdim=True).clamp(min=1)  # (n, P*n)
        labels = torch.arange(n, device=x.device) + rank * n
        logits_i2t, logits_t2i = t * s_i2t, t * s_t2i
        loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
        with torch.no_grad():
            acc_i2t = (logits_i2t.argmax(1) == labels).float().mean()
            acc_t2i = (logits_t2i.argmax(1) == labels).float().mean()
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "logit_scale": t.detach()}
