"""mmcl: multimodal image-text pretraining (CLIP, SigLIP, SimVLM PrefixLM) on WebDataset + Accelerate."""

__version__ = "0.1.0"
