"""Loss terms: one objective per file, registered in `mmcl.registry.LOSSES` (see `base.py`)."""

from __future__ import annotations

from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.captioning import CaptionTerm, PrefixLMLoss
from mmcl.losses.clip_loss import ClipLoss, ClipTerm
from mmcl.losses.mlm import MLMTerm
from mmcl.losses.moco import MoCoTerm
from mmcl.losses.negclip import NegCLIPTerm
from mmcl.losses.nnclr import NearestNeighbourTerm
from mmcl.losses.siglip_loss import SigLipLoss, SigLipTerm
from mmcl.losses.simclr import SimCLRTerm
from mmcl.losses.simcse import SimCSETerm
from mmcl.losses.simsiam import BYOLTerm, SimSiamTerm
from mmcl.registry import LOSSES


def term_class(name: str, where: str = "loss.terms") -> type[LossTerm]:
    """The registered term `name`; a ConfigError naming the closest one otherwise."""
    from mmcl.config import ConfigError

    try:
        return LOSSES.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None


__all__ = [
    "LossTerm",
    "StepContext",
    "ClipLoss",
    "ClipTerm",
    "SigLipLoss",
    "SigLipTerm",
    "PrefixLMLoss",
    "CaptionTerm",
    "SimCLRTerm",
    "SimSiamTerm",
    "BYOLTerm",
    "SimCSETerm",
    "MoCoTerm",
    "NearestNeighbourTerm",
    "NegCLIPTerm",
    "MLMTerm",
    "term_class",
]
