"""Loading the app's model: an mmcl run or checkpoint folder, or an open_clip model by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mmcl.utils import UserError


def load_run(path: str | Path) -> Any:
    """`mmcl.inference.load_pipeline` for a run folder or checkpoint folder, with a clear error if absent."""
    path = Path(str(path).strip()).expanduser()
    if not str(path) or not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder")
    from mmcl.inference import load_pipeline

    return load_pipeline(path)


class OpenClipPipeline:
    """The `mmcl.inference.Pipeline` protocol over an open_clip contrastive model.

    Args:
        name: an open_clip model name (`open_clip.list_models()`), e.g. 'ViT-B-32'.
        pretrained: a pretrained tag (`open_clip.list_pretrained_tags_by_model(name)`), e.g. 'laion2b_s34b_b79k';
            empty = random weights. Tags are downloaded from the Hugging Face hub: this needs internet.
        device: torch device.
    """

    can_encode = True
    can_caption = False

    def __init__(self, name: str, pretrained: str = "", device: str = "cpu") -> None:
        import open_clip

        name, pretrained = name.strip(), pretrained.strip()
        if not name:
            raise UserError("no open_clip model name given (e.g. 'ViT-B-32')")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device
            )
        except Exception as e:  # hub errors differ by version (HTTP, offline-mode, OSError, RuntimeError, ...)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            hint = (
                " Pretrained weights come from the Hugging Face hub: this needs internet access." if pretrained else ""
            )
            raise UserError(
                f"could not load open_clip model '{name}' (pretrained '{pretrained}'): {reason}.{hint}"
            ) from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device

    def encode_images(self, images: list[Image.Image]) -> Any:
        import torch

        with torch.no_grad():
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            return self.model.encode_image(x, normalize=True).float().cpu()

    def encode_texts(self, texts: list[str]) -> Any:
        import torch

        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().cpu()

    def caption(self, images: list[Image.Image], prefix: list[str] | None = None, **gen: Any) -> list[str]:
        raise UserError("open_clip contrastive models cannot caption")
