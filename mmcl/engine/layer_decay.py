"""Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT), as fine-tuning uses it.

In each tower of n blocks, block i (0-based) trains at lr * decay**(n - i), the parameters before the
block stack (embeddings) at lr * decay**(n + 1), and those after it (final norm, projection) and the
model's own scalars (temperature, bias) at lr: the layers nearest the input, which hold the most
general features, move least. Optimizer groups carry the factor as `lr_scale` (timm's convention),
which `mmcl.engine.optim.set_lr` applies.
"""

from __future__ import annotations

import re

from torch import nn

TOWER_NAMES = ("image", "text")
# A tower's output projection is "after the stack" wherever it is registered (open_clip registers
# text_projection before the blocks).
_PROJECTION = re.compile(r"(proj|text_projection|visual_projection)(\.weight|\.bias)?$")


def block_stack(tower: nn.Module) -> tuple[str, int] | None:
    """(qualified name, length) of the longest `nn.ModuleList` / `nn.Sequential` of same-class modules
    in `tower` (timm's ViT `blocks`, open_clip's `resblocks`, transformers' `encoder.layers`), or None."""
    best: tuple[str, int] | None = None
    for name, m in tower.named_modules():
        same_kind = isinstance(m, (nn.ModuleList, nn.Sequential)) and len({type(c) for c in m}) == 1
        if same_kind and (best is None or len(m) > best[1]):
            best = (name, len(m))
    return best


def layer_lr_scales(module: nn.Module, decay: float) -> dict[str, float]:
    """Parameter name (as `module.named_parameters()` gives it) -> lr factor; absent names train at lr.

    Towers are the sub-modules named `image` / `text`; their block stack is `block_stack`'s.
    """
    scales: dict[str, float] = {}
    if decay == 1.0:
        return scales
    for tower_name, tower in module.named_modules():
        if tower_name.rsplit(".", 1)[-1] not in TOWER_NAMES:
            continue
        found = block_stack(tower)
        if found is None:
            continue
        stack_name, n = found
        block = re.compile(rf"{re.escape(stack_name)}\.(\d+)\.")
        after_stack = False
        for name, _ in tower.named_parameters():
            m = block.match(name)
            if m:
                after_stack = True
                depth = int(m.group(1)) + 1
            elif _PROJECTION.fullmatch(name) or after_stack:
                depth = n + 1
            else:
                depth = 0
            scales[f"{tower_name}.{name}"] = decay ** (n + 1 - depth)
    return scales


def split_by_lr_scale(module: nn.Module, groups: list[dict], decay: float) -> list[dict]:
    """Split optimizer `groups` (same weight decay inside each) into one group per lr factor."""
    scales = layer_lr_scales(module, decay)
    by_param = {id(p): scales.get(name, 1.0) for name, p in module.named_parameters()}
    out: list[dict] = []
    for group in groups:
        split: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            split.setdefault(by_param[id(p)], []).append(p)
        out.extend({**group, "params": ps, "lr_scale": scale} for scale, ps in sorted(split.items()))
    return out
