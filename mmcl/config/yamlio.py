"""YAML in and out: duplicate keys refused, brace patterns kept as written, non-UTF-8 files named in one line,
and dotted command-line overrides (`train.lr=1e-3`, the value parsed as YAML)."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any

import yaml

from mmcl.config.typed import ConfigError, to_dict
from mmcl.utils import atomic_write_text

_BRACE_GROUP = re.compile(r"\{[^{}\s:]*(?:\.\.|,)[^{}\s:]*\}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError(f"{mark.name}:{mark.line + 1}:{mark.column + 1}: duplicate key '{key}'")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """`text` parsed with the safe loader; duplicate keys and syntax errors become one-line ConfigErrors.

    Args:
        where: a file name (errors read `FILE:LINE:COL: ...`) or a description such as "override 'a=b'".
    """
    loader = _UniqueKeyLoader(text)
    loader.name = where  # the marks in errors carry this instead of "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:  # PyYAML's report spans several lines with a caret drawing: one line here
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{position}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _parse_value(raw: str, item: str) -> Any:
    """An override's value as YAML, with shell brace groups kept as written (`[/d/{000..041}.tar]`)."""
    groups: list[str] = []

    def protect(m: re.Match) -> str:
        groups.append(m.group(0))
        return f"__mmcl_brace_{len(groups) - 1}__"

    text = raw
    while True:  # innermost groups first, so nested ones ({a,{b,c}}) are protected whole
        protected = _BRACE_GROUP.sub(protect, text)
        if protected == text:
            break
        text = protected
    value = parse_yaml(text, f"override {item!r}, value")

    def restore(v: Any) -> Any:
        if isinstance(v, str):
            for i in reversed(range(len(groups))):
                v = v.replace(f"__mmcl_brace_{i}__", groups[i])
            return v
        if isinstance(v, list):
            return [restore(x) for x in v]
        if isinstance(v, dict):
            return {restore(k): restore(x) for k, x in v.items()}
        return v

    return restore(value) if groups else value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`['train.lr=1e-3', 'data.batch_size=8']` -> nested dict of YAML-parsed values.

    Shell brace patterns in a value are kept as written: `data.train_shards=[/d/{00000..00099}.tar]`.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[leaf] = _parse_value(raw, item) if raw.strip() else ""
    return nested


# Byte-order marks an editor may write (Windows Notepad's "Unicode" is UTF-16 LE with one): decoded as marked.
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]  # fmt: skip


def read_config_text(path: Path) -> str:
    """The text of config file `path`: UTF-8, or the encoding its byte-order mark names; else one line saying so."""
    data = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not {encoding.upper()} text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            "save the file as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; syntax errors and duplicate keys name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_config_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write `obj` (a dataclass or plain data) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


# --------------------------------------------------------------------------- schema
