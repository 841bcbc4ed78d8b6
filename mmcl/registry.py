"""Named builders: models and loss terms are looked up by registered name, never by name sniffing."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """A name -> builder map with a decorator to fill it and a clear error for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


MODELS: Registry = Registry("model architecture")  # arch name -> fn(ModelConfig) -> nn.Module
LOSSES: Registry = Registry("loss term")  # term name -> LossTerm subclass (mmcl.losses.base)
IMAGE_TOWERS: Registry = Registry("image tower kind")  # kind -> fn(ImageTowerConfig, embed_dim) -> nn.Module
TEXT_TOWERS: Registry = Registry("text tower kind")  # kind -> fn(TextTowerConfig, embed_dim, Tokenizer) -> nn.Module
