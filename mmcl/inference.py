"""Load a trained model for use: encode images and texts, caption images.

pipe = load_pipeline("runs/demo")          # a run folder, its final/ or a checkpoints/step_*/ folder
img = pipe.encode_images([PIL.Image...])   # (N, D), L2-normalised
txt = pipe.encode_texts(["a red circle"])  # (N, D)
pipe.caption([image], prefix="a small")    # PrefixLM / joint models
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mmcl.config import ExperimentConfig, from_dict, load_yaml
from mmcl.data.transforms import image_transform
from mmcl.utils import UserError


def find_weights(path: str | Path) -> tuple[Path, Path]:
    """(model.safetensors, config.yaml) for a run folder, a final/ folder or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder")
    if path.is_file():
        raise UserError(f"{path}: give the run or checkpoint folder, not a file")
    candidates = [path, path / "final"]
    from mmcl.engine.checkpoint import latest_checkpoint

    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        candidates.append(latest)
    for folder in candidates:
        weights = folder / "model.safetensors"
        if weights.is_file():
            for cfg in (folder / "config.yaml", folder.parent / "config.yaml", folder.parent.parent / "config.yaml"):
                if cfg.is_file():
                    return weights, cfg
    raise UserError(f"{path}: not an mmcl run or checkpoint (no model.safetensors with a config.yaml)")


@dataclass
class Pipeline:
    """A model ready for inference, with its preprocessing and tokenizer."""

    model: torch.nn.Module
    config: ExperimentConfig
    device: torch.device

    def __post_init__(self) -> None:
        pre = self.model.preprocess_cfg()
        self.preprocess = image_transform(pre["image_size"], pre["mean"], pre["std"], train=False)
        self.tokenizer = getattr(self.model, "tokenizer", None)

    @property
    def can_encode(self) -> bool:
        return hasattr(self.model, "encode_image") and hasattr(self.model, "encode_text")

    @property
    def can_caption(self) -> bool:
        return hasattr(self.model, "caption")

    def images_to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        if not self.can_encode:
            raise UserError(f"this {self.config.model.arch} model has no image/text encoder (it only captions)")
        if isinstance(images, torch.Tensor):
            return self.model.encode_image(images.to(self.device), normalize=True).float().cpu()
        out = [
            self.model.encode_image(self.images_to_tensor(images[i : i + batch_size]), normalize=True)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        if not self.can_encode:
            raise UserError(f"this {self.config.model.arch} model has no image/text encoder (it only captions)")
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer(list(texts[i : i + batch_size]))
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device), normalize=True))
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def caption(self, images: list[Image.Image], prefix: str | list[str] | None = None, **generate) -> list[str]:
        if not self.can_caption:
            raise UserError(f"this {self.config.model.arch} model cannot caption (train a prefix_lm or joint model)")
        if isinstance(prefix, str):
            prefix = [prefix] * len(images)
        return self.model.caption(self.images_to_tensor(images), prefix=prefix, **generate)


def load_pipeline(path: str | Path, device: str | torch.device | None = None) -> Pipeline:
    """Load the model saved at `path` (see `find_weights`) in eval mode."""
    from mmcl.engine.checkpoint import load_model_weights
    from mmcl.models import build_model

    weights, cfg_path = find_weights(path)
    try:
        cfg = from_dict(ExperimentConfig, load_yaml(cfg_path))
    except ValueError as e:
        raise UserError(f"{cfg_path}: not an mmcl config ({e})") from None
    cfg.model.image.pretrained = False  # the checkpoint holds the weights: never reach for the hub
    cfg.model.init_from = ""  # nor load the weights training started from
    model = build_model(cfg.model)
    try:
        load_model_weights(model, weights)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Pipeline(model.to(device).eval(), cfg, device)
