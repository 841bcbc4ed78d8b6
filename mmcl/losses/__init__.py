"""Loss terms: one objective per file, found by `mmcl.registry.LOSSES` (see `base.py` for what a term declares).

Nothing here lists the terms: the registry reads this package's modules itself, and a new file is a new
term. Importing the package is light (no torch); `from mmcl.losses import ClipLoss` still works, by
looking the name up in the package's modules on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def term_class(name: str, where: str = "loss.terms") -> Any:
    """The registered term `name` (its module imported); a ConfigError naming the closest one otherwise."""
    from mmcl.config import ConfigError
    from mmcl.registry import LOSSES

    try:
        return LOSSES.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
