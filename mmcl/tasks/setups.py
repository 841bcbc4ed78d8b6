"""Toy-size setups of every registered loss term, from the terms' own `test_setup` declarations.

The tests that must cover every term (accumulation, resume, 2 processes) iterate over
`mmcl.registry.LOSSES` through this module: a new term is covered without editing a list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mmcl.registry import LOSSES

DEFAULT_PRESET = "clip-tiny"


@dataclass
class TermSetup:
    """A toy-size training setup: a model preset, the `loss.terms` entries and config overrides."""

    preset: str = DEFAULT_PRESET
    entries: list[Any] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def terms(self) -> str:
        """The `loss.terms=` value."""
        return json.dumps(self.entries)

    @property
    def names(self) -> list[str]:
        return [e if isinstance(e, str) else e["name"] for e in self.entries]

    def config(self) -> list[str]:
        """Overrides for `load_experiment` building this setup."""
        return [f"model.preset={self.preset}", f"loss.terms={self.terms}", *self.overrides]


def term_setup(name: str) -> TermSetup:
    """Term `name`'s declared toy setup (`LossTerm.test_setup`: 'preset', 'options', 'with', 'overrides'):
    the companions ('with', e.g. clip) first, then the term with its toy options."""
    declared = dict(getattr(LOSSES.get(name), "test_setup", {}) or {})
    entries = [*declared.get("with", []), {"name": name, **declared.get("options", {})}]
    return TermSetup(declared.get("preset", DEFAULT_PRESET), entries, list(declared.get("overrides", [])))


def all_setups(include_test_terms: bool = False) -> dict[str, TermSetup]:
    """Every registered term's setup (terms named `test_*`, registered by test modules, left out by default)."""
    return {n: term_setup(n) for n in LOSSES.names() if include_test_terms or not n.startswith("test_")}


def mixed(setups: list[TermSetup]) -> TermSetup:
    """One setup training all of `setups` together (they must share a preset): each term once."""
    presets = {s.preset for s in setups}
    if len(presets) != 1:
        raise ValueError(f"setups on different presets cannot be mixed: {sorted(presets)}")
    entries: dict[str, Any] = {}
    for s in setups:
        for name, entry in zip(s.names, s.entries):
            if name not in entries or not isinstance(entry, str):  # a term's own entry (its options) wins
                entries[name] = entry
    overrides = list(dict.fromkeys(o for s in setups for o in s.overrides))
    return TermSetup(presets.pop(), list(entries.values()), overrides)
