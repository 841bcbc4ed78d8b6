"""The one encoder protocol (`Encoder`) and its implementations: a trained mmcl model and an open_clip model.

pipe = load_pipeline("runs/demo")          # a run, final/ or checkpoint folder; a transformers or open_clip folder
img = pipe.encode_images([PIL.Image...])   # (N, D), L2-normalised
txt = pipe.encode_texts(["a red circle"])  # (N, D)
pipe.caption([image], prefix="a small")    # PrefixLM / joint models
pipe.logit_scale_and_bias()                # (exp(logit_scale) within the model's own limit, SigLIP bias or None)

Evaluation (`mmcl.eval.runner`, the trainer's hook via `Pipeline.from_model`), the retrieval index and the
app all take an `Encoder`; what a model can do is read from `can_encode` / `can_caption`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from mmcl.config import ExperimentConfig, from_dict, load_yaml
from mmcl.data.transforms import transform_from_preprocess
from mmcl.run_folder import find_weights, is_run_folder  # noqa: F401  (part of the loading API)
from mmcl.utils import UserError


class Encoder(Protocol):
    """What eval, the index and the app need from a model: embeddings, captions, the similarity scale.

    Attributes:
        can_encode: `encode_images` / `encode_texts` / `logit_scale_and_bias` work (contrastive towers).
        can_caption: `caption` works (a captioning decoder).
    """

    can_encode: bool
    can_caption: bool

    def encode_images(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings of PIL images (or an already preprocessed batch)."""
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings."""
        ...

    def caption(self, images: list[Image.Image], prefix: str | list[str] | None = None, **generate: Any) -> list[str]:
        """One caption per image, continuing `prefix` when given."""
        ...

    def logit_scale_and_bias(self) -> tuple[float, float | None]:
        """The learned temperature exp(logit_scale), clamped to the model's own maximum, and the SigLIP bias."""
        ...


@dataclass
class Pipeline:
    """An mmcl model ready for inference, with its preprocessing and tokenizer (an `Encoder`).

    Args:
        model: a built mmcl model (`mmcl.models.build_model`), in eval mode.
        config: the run's config (None for an in-memory model, e.g. the trainer's eval hook).
        device: where the model lives.
    """

    model: torch.nn.Module
    config: ExperimentConfig | None
    device: torch.device

    def __post_init__(self) -> None:
        self.preprocess = transform_from_preprocess(self.model.preprocess_cfg(), train=False)  # the source's
        self.tokenizer = self.model.tokenizer
        # what the model declares it can do (`CLIP.can_encode`, `PrefixLM.can_caption`, ...); nothing when silent
        self.can_encode = bool(getattr(self.model, "can_encode", False))
        self.can_caption = bool(getattr(self.model, "can_caption", False))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Pipeline:
        """An `Encoder` over an in-memory model (left in whatever train/eval mode it is in)."""
        return cls(model, None, next(model.parameters()).device)

    @property
    def _arch(self) -> str:
        return self.config.model.arch if self.config is not None else type(self.model).__name__

    def images_to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        if not self.can_encode:
            raise UserError(f"this {self._arch} model has no image/text encoder (it only captions)")
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
            raise UserError(f"this {self._arch} model has no image/text encoder (it only captions)")
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer(list(texts[i : i + batch_size]))
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device), normalize=True))
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def caption(self, images: list[Image.Image], prefix: str | list[str] | None = None, **generate) -> list[str]:
        if not self.can_caption:
            raise UserError(f"this {self._arch} model cannot caption (train a prefix_lm or joint model)")
        if isinstance(prefix, str):
            prefix = [prefix] * len(images)
        return self.model.caption(self.images_to_tensor(images), prefix=prefix, **generate)

    def logit_scale_and_bias(self) -> tuple[float, float | None]:
        if not self.can_encode:
            raise UserError(f"this {self._arch} model has no image/text encoder (it only captions)")
        scale, bias = self.model.scale_and_bias()  # clamped at the model's own max_logit_scale
        return float(scale.detach()), (float(bias.detach()) if bias is not None else None)

    def classify(
        self,
        images: Image.Image | str | Path | list[Image.Image | str | Path],
        labels: list[str],
        templates: str | list[str] | None = None,
    ) -> torch.Tensor:
        """Zero-shot probabilities of `labels` for each image, as the model was trained to score them.

        Args:
            images: a PIL image or an image file, or a list of them.
            labels: the candidate class names.
            templates: prompts holding `{}` (a string or a list; the class embedding is the mean over them),
                or a built-in set name ('openai', 'short', ...: `mmcl.eval.templates`); default 'a photo of a {}.'.

        Returns:
            (N, L) float32: softmax over the labels (CLIP), or a sigmoid per label (models with a SigLIP bias,
            as transformers' zero-shot pipeline does).
        """
        from mmcl.eval.templates import load_templates
        from mmcl.eval.zeroshot import build_classifier, class_probabilities

        if not isinstance(images, (list, tuple)):
            images = [images]
        if isinstance(labels, str) or not labels:
            raise UserError("classify needs a non-empty list of labels")
        if templates is None:
            templates = ["a photo of a {}."]
        elif isinstance(templates, str):
            templates = [templates] if "{}" in templates else load_templates(templates)
        pil = [_open_image(im) for im in images]
        classifier = build_classifier(self.encode_texts, list(labels), list(templates))
        scale, bias = self.logit_scale_and_bias()
        return class_probabilities(self.encode_images(pil), classifier, scale, bias)


def _open_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{image}: not a readable image ({type(e).__name__})") from None


def load_pipeline(path: str | Path, device: str | torch.device | None = None) -> Pipeline:
    """Load any model mmcl can read, in eval mode: an mmcl run, `final/` or checkpoint folder (`find_weights`),
    a transformers CLIPModel / SiglipModel folder, an open_clip folder (`open_clip_config.json` + weights), or
    `hf:ORG/NAME` / `hf-hub:ORG/NAME` on a machine with the hub (`mmcl.models.pretrained`)."""
    from mmcl.engine.checkpoint import load_model_weights
    from mmcl.models import build_model
    from mmcl.models.pretrained import is_foreign

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_foreign(path):
        from mmcl.models.pretrained import pretrained_model_config

        model_cfg = pretrained_model_config(path)  # init_from = the folder: build_model loads its weights
        model = build_model(model_cfg)
        return Pipeline(model.to(device).eval(), ExperimentConfig(model=model_cfg), device)
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
    return Pipeline(model.to(device).eval(), cfg, device)


OPEN_CLIP_MAX_LOGIT_SCALE = 100.0  # open_clip's training loop clamps logit_scale to log(100)


class OpenClipPipeline:
    """The `Encoder` protocol over an open_clip contrastive model.

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

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        return self.model.encode_image(images.to(self.device), normalize=True).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().cpu()

    def caption(self, images: list[Image.Image], prefix: str | list[str] | None = None, **generate: Any) -> list[str]:
        raise UserError("open_clip contrastive models cannot caption")

    def logit_scale_and_bias(self) -> tuple[float, float | None]:
        scale = min(float(self.model.logit_scale.detach().exp()), OPEN_CLIP_MAX_LOGIT_SCALE)
        bias = getattr(self.model, "logit_bias", None)  # only open_clip's SigLIP models have one
        return scale, (float(bias.detach()) if bias is not None else None)
