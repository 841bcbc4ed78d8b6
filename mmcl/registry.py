"""Named builders: models and loss terms are looked up by registered name, never by name sniffing.

Loss terms are found, not listed (`LOSSES`, a `TermRegistry`). A term is one module that decorates its
class with `@LOSSES.register("name")` and names its options dataclass in the class body
(`Options = MyOptions`); the registry finds it in

* the built-in package `mmcl.losses` (every module of it, `pkgutil`),
* the modules a config names in `loss.plugins` (`[my_package.my_term]`: a term kept in the user's own
  repository, importable from `sys.path` / PYTHONPATH),
* the modules installed distributions advertise under the entry-point group `mmcl.losses`
  (`[project.entry-points."mmcl.losses"] my_term = "my_package.my_term"`).

Reading a config must not import torch (seconds on a loaded machine, for a YAML), yet each term's options
are typed by the dataclass declared in its own file beside the torch code. So a term module is *read*
before it is imported: its source is parsed (`ast`), the registered classes and their `Options` found,
and only that dataclass is executed in a small side module, with the module-level imports and constants
its fields name and the dataclasses it derives from. The term module itself is imported when the term is
built (`LOSSES.get`), when training needs torch anyway. The one rule this puts on a term file: its options
dataclass may only name things that import without torch (builtins, `dataclasses`, `typing`, light config
modules such as `mmcl.data.augment`). A module the reader cannot follow (a registration whose name is not
a literal) is imported instead: correct, only slower.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import importlib
import importlib.util
import pkgutil
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ENTRY_POINT_GROUP = "mmcl.losses"


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

    def _unknown(self, name: str) -> KeyError:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return KeyError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(known)}")

    def get(self, name: str) -> F:
        if name not in self._items:
            raise self._unknown(name)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self.names()


@dataclass
class _Found:
    """A term known by reading its module: where it lives and its options dataclass (None: not read yet)."""

    module: str
    cls_name: str
    options: type | None


class TermRegistry(Registry):
    """`Registry` of loss terms that discovers them (see the module docstring).

    Args:
        kind: what the error messages call an entry.
        package: the package whose modules hold the built-in entries.
        group: the entry-point group of installed plug-ins.
    """

    def __init__(self, kind: str, package: str, group: str) -> None:
        super().__init__(kind)
        self.package, self.group = package, group
        self._found: dict[str, _Found] = {}
        self._read: set[str] = set()  # modules read (or imported) so far
        self._discovered = False

    # ---------------------------------------------------------------- discovery

    def discover(self) -> None:
        """Read the built-in package's modules and the entry points' (once)."""
        if self._discovered:
            return
        self._discovered = True
        spec = importlib.util.find_spec(self.package)
        paths = list(spec.submodule_search_locations or []) if spec else []
        for info in pkgutil.iter_modules(paths):
            self._read_module(f"{self.package}.{info.name}")
        for ep in metadata.entry_points(group=self.group):
            self._read_module(ep.value.split(":")[0].strip())

    def load_plugins(self, modules: Iterable[str], where: str = "loss.plugins") -> None:
        """Read plug-in modules (`pkg.module`); a module that cannot be found is a one-line KeyError."""
        self.discover()
        for i, module in enumerate(modules):
            if not _parent_found(module) or importlib.util.find_spec(module) is None:
                raise KeyError(f"{where}[{i}]: no module '{module}' on the Python path (sys.path / PYTHONPATH)")
            self._read_module(module)

    def _read_module(self, module: str) -> None:
        if module in self._read:
            return
        self._read.add(module)
        if module in sys.modules:  # already imported: its registrations ran
            return
        spec = importlib.util.find_spec(module)
        source = spec.loader.get_source(module) if spec and spec.loader and hasattr(spec.loader, "get_source") else None
        found = _registrations(source, module) if source else None
        if found is None:  # not readable: import it (its decorators register)
            importlib.import_module(module)
            return
        for name, (cls_name, options) in found.items():
            self._add_found(name, _Found(module, cls_name, options))

    def _add_found(self, name: str, found: _Found) -> None:
        old = self._found.get(name)
        if old is not None and old.module != found.module:
            raise KeyError(f"{self.kind} '{name}' is registered twice ({old.module} and {found.module})")
        self._found[name] = found

    def register(self, name: str) -> Callable[[F], F]:
        def add(cls: F) -> F:
            module = getattr(cls, "__module__", "")
            old = self._items.get(name)
            if old is not None and old is not cls:
                raise KeyError(f"{self.kind} '{name}' is registered twice ({old.__module__} and {module})")
            found = self._found.get(name)
            if found is not None and found.module != module:
                raise KeyError(f"{self.kind} '{name}' is registered twice ({found.module} and {module})")
            self._items[name] = cls
            self._read.add(module)
            return cls

        return add

    # ---------------------------------------------------------------- lookup

    def names(self) -> list[str]:
        self.discover()
        return sorted(set(self._items) | set(self._found))

    def module_of(self, name: str) -> str:
        """The module defining term `name` (without importing it)."""
        self.discover()
        if name in self._items:
            return self._items[name].__module__
        if name in self._found:
            return self._found[name].module
        raise self._unknown(name)

    def options(self, name: str) -> type:
        """Term `name`'s options dataclass, without importing its module when it was read."""
        self.discover()
        if name in self._items:
            return getattr(self._items[name], "Options", _NoOptions)
        if name not in self._found:
            raise self._unknown(name)
        return self._found[name].options or _NoOptions

    def get(self, name: str) -> F:
        """The term class (imports its module on first use)."""
        self.discover()
        if name not in self._items and name in self._found:
            importlib.import_module(self._found[name].module)
            if name not in self._items:
                raise KeyError(f"{self._found[name].module} did not register {self.kind} '{name}' on import")
        return super().get(name)


@dataclass
class _NoOptions:
    """A term without options."""


def _parent_found(module: str) -> bool:
    """Whether the packages above `module` exist (find_spec raises on a missing parent)."""
    parent = module.rpartition(".")[0]
    try:
        return not parent or importlib.util.find_spec(parent) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- reading a term module


def _registrations(source: str, module: str) -> dict[str, tuple[str, type | None]] | None:
    """{term name: (class name, options dataclass)} of the `@LOSSES.register("name")` classes in `source`;
    None when a registration cannot be read without importing (a computed name)."""
    tree = ast.parse(source)
    top = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    consts = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    out: dict[str, tuple[str, type | None]] = {}
    for cls in top.values():
        for deco in cls.decorator_list:
            if not (
                isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "register"
                and isinstance(deco.func.value, ast.Name)
                and deco.func.value.id == "LOSSES"
            ):
                continue
            arg = deco.args[0] if deco.args else None
            name = arg.value if isinstance(arg, ast.Constant) else consts.get(getattr(arg, "id", ""))
            if not isinstance(name, str):
                return None
            options_name = _options_name(cls, top)
            options = _NoOptions if options_name is None else _exec_options(tree, options_name, module)
            if options is None:
                return None
            out[name] = (cls.name, options)
    return out


def _options_name(cls: ast.ClassDef, top: dict[str, ast.ClassDef]) -> str | None:
    """The name bound to `Options` in `cls` or the module classes it derives from."""
    for stmt in cls.body:
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "Options" and isinstance(stmt.value, ast.Name):
                return stmt.value.id
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in top:
            found = _options_name(top[base.id], top)
            if found is not None:
                return found
    return None


def _exec_options(tree: ast.Module, name: str, module: str) -> type | None:
    """Execute class `name` of `tree` (and what it needs from the module's top level) in a side module."""
    defs: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defs[node.target.id] = node
    imported: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__":
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                imported[bound] = (
                    ast.ImportFrom(module=node.module, names=[alias], level=node.level)
                    if isinstance(node, ast.ImportFrom)
                    else ast.Import(names=[alias])
                )
    needed: list[str] = []
    todo = [name]
    while todo:
        n = todo.pop()
        if n in needed or n not in defs and n not in imported:
            continue
        needed.append(n)
        if n in defs:
            todo += [x.id for x in ast.walk(defs[n]) if isinstance(x, ast.Name) and not hasattr(builtins, x.id)]
    if name not in defs or not isinstance(defs[name], ast.ClassDef):
        return None
    order = {id(node): i for i, node in enumerate(tree.body)}
    body = [imported[n] for n in needed if n in imported and n not in defs]
    body += sorted({id(defs[n]): defs[n] for n in needed if n in defs}.values(), key=lambda s: order[id(s)])
    code = ast.Module(body=body, type_ignores=[])
    side = types.ModuleType(f"{module}.__options__")
    side.__package__ = module.rpartition(".")[0]
    sys.modules[side.__name__] = side  # typing.get_type_hints resolves the string annotations here
    exec(compile(ast.fix_missing_locations(code), f"<options of {module}>", "exec"), side.__dict__)  # noqa: S102
    return side.__dict__[name]


MODELS: Registry = Registry("model architecture")  # arch name -> fn(ModelConfig) -> nn.Module
LOSSES: TermRegistry = TermRegistry("loss term", "mmcl.losses", ENTRY_POINT_GROUP)  # name -> LossTerm subclass
IMAGE_TOWERS: Registry = Registry("image tower kind")  # kind -> fn(ImageTowerConfig, embed_dim) -> nn.Module
TEXT_TOWERS: Registry = Registry("text tower kind")  # kind -> fn(TextTowerConfig, embed_dim, Tokenizer) -> nn.Module
