"""LiT locking: freeze a pretrained tower, or all of it but its last N layers.

Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning": a locked tower keeps its
pretrained representation and the other tower learns to read it. Frozen parameters get
`requires_grad=False`; `set_locked_eval` puts every fully frozen sub-module in eval mode (no dropout,
no BatchNorm statistics updates), and the model calls it again after each `.train()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def lock_timm(trunk: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze a timm model except its last `unlocked_layers` layer groups (timm's `group_matcher`).

    For ViTs the groups are [embeddings, block 0, ..., block n-1] with the final norm in the last block's
    group; for ResNets each residual block is a group.
    """
    for p in trunk.parameters():
        p.requires_grad_(False)
    if unlocked_layers <= 0:
        return
    from timm.models import group_parameters

    groups = group_parameters(trunk, trunk.group_matcher())
    for gid in sorted(groups)[-unlocked_layers:]:
        for name in groups[gid]:
            trunk.get_parameter(name).requires_grad_(True)


def lock_layer_stack(
    named_params: Iterable[tuple[str, nn.Parameter]], layer_prefix: str, num_layers: int, unlocked_layers: int = 0
) -> None:
    """Freeze parameters given in registration order, except the last `unlocked_layers` layers.

    Parameters named `{layer_prefix}.{i}.*` belong to layer i; those registered before the stack
    (embeddings) stay frozen, those after it (a final norm) go with the last layer.
    """
    pattern = re.compile(rf"{re.escape(layer_prefix)}\.(\d+)\.")
    first_unlocked = num_layers - unlocked_layers
    after_stack = False
    for name, p in named_params:
        m = pattern.match(name)
        if m:
            after_stack = True
            p.requires_grad_(int(m.group(1)) >= first_unlocked)
        else:
            p.requires_grad_(after_stack and unlocked_layers > 0)


def set_locked_eval(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen in eval mode (top-down, largest first)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        set_locked_eval(child)


def largest_module_list(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest `nn.ModuleList` inside `module` (a transformer's layer stack) and its qualified name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise ValueError(f"{type(module).__name__} has no layer stack (nn.ModuleList) to lock by layers")
    return best
