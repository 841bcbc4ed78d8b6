"""mmcl: multimodal image-text pretraining (CLIP, SigLIP, SimVLM PrefixLM) on WebDataset + Accelerate.

The Python facade, in the spirit of open_clip and transformers (nothing heavy is imported until used):

    import mmcl
    mmcl.list_presets()                          # model presets: ['clip-demo', 'clip-tiny', ...]
    pipe = mmcl.load("runs/demo")                # an mmcl run, a transformers or open_clip folder, hf:ORG/NAME
    pipe.classify("cat.jpg", ["a cat", "a dog"])  # (1, 2) probabilities
    pipe.encode_images([...]), pipe.encode_texts([...]), pipe.caption([...])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs only: importing mmcl stays light (no torch)
    from mmcl.inference import Pipeline

_LAZY = {"Pipeline": "mmcl.inference", "load_pipeline": "mmcl.inference", "build_model": "mmcl.models"}


def load(path_or_hf: str | Path, device: str | None = None) -> Pipeline:
    """A model ready for inference (`mmcl.inference.Pipeline`): an mmcl run, `final/` or checkpoint folder, a
    transformers CLIPModel/SiglipModel folder, an open_clip folder, or `hf:ORG/NAME` / `hf-hub:ORG/NAME`
    (downloaded from the Hugging Face hub). `device` defaults to CUDA when available."""
    from mmcl.inference import load_pipeline

    return load_pipeline(path_or_hf, device=device)


def list_presets() -> list[str]:
    """Names of the bundled model presets (`model.preset=NAME`, `mmcl.config.model_config(NAME)`)."""
    return sorted(p.stem for p in (Path(__file__).parent / "models" / "configs").glob("*.yaml"))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmcl' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "load", "list_presets", *_LAZY]
