"""Losses: one objective per class, each returning named scalars {'loss', ...}."""

from mmcl.losses.clip_loss import ClipLoss
from mmcl.losses.siglip_loss import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
