"""Built-in datasets addressed as `builtin:NAME` in any shard list, written on first use.

    data.train_shards=[builtin:shapes/train]   # 20,000 synthetic captioned shapes (32 px), 40 classes
    eval.shards=[builtin:shapes/val]           # 1,000 held-out ones (classnames.txt beside them)
    builtin:shapes-cf/train                    # shapes/train with a counterfactual scene per sample (KEY.cf.*)
    builtin:digits, builtin:photos             # scikit-learn digits, skimage photographs

They live under $MMCL_CACHE (default ~/.cache/mmcl/builtin) and are written once (the shard
writer resumes, so an interrupted first write is finished by the next run).
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcl.utils import UserError

PREFIX = "builtin:"
SHAPES = {"train": 20000, "val": 1000}
IMAGE_SIZE = 32


def cache_root() -> Path:
    return Path(os.environ.get("MMCL_CACHE", Path.home() / ".cache" / "mmcl")) / "builtin"


def is_builtin(pattern: str) -> bool:
    return pattern.startswith(PREFIX)


def builtin_dir(pattern: str) -> Path:
    """The folder a `builtin:` name stands for (not necessarily written yet)."""
    name = pattern[len(PREFIX) :]
    known = [f"shapes/{s}" for s in SHAPES] + ["shapes-cf/train", "digits", "photos"]
    if name not in known:
        raise UserError(f"unknown built-in dataset '{pattern}': choose one of {', '.join(PREFIX + k for k in known)}")
    return cache_root() / name


def ensure_builtin(pattern: str, progress: bool = True) -> Path:
    """Write the built-in dataset if it is not there yet; return its folder."""
    from mmcl.data.writer import write_real_shards, write_synthetic_shards

    out = builtin_dir(pattern)
    if (out / "sizes.json").is_file():
        return out
    name = pattern[len(PREFIX) :]
    if name.startswith(("shapes/", "shapes-cf/")):
        split = name.split("/")[1]
        write_synthetic_shards(out, SHAPES[split], split=split, image_size=IMAGE_SIZE, maxcount=1000, num_workers=2,
                               progress=progress, counterfactuals=name.startswith("shapes-cf/"))  # fmt: skip
    else:
        write_real_shards(out, name, image_size=64 if name == "digits" else 128, progress=progress)
    return out
