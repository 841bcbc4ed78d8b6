"""Prompt templates and class names for zero-shot classification.

Built-in template sets (data files in `mmcl/eval/templates/`):

- `openai`: the 80 ImageNet prompts of CLIP (Radford et al. 2021), as in open_clip's
  `OPENAI_IMAGENET_TEMPLATES`;
- `short`: the 7-prompt subset CLIP's authors selected (open_clip's `SIMPLE_IMAGENET_TEMPLATES`);
- `cifar`: CLIP's 18 CIFAR-10 prompts (CLIP_benchmark's `cifar10` set);
- `none`: the bare class name (`"{}"`).

A template holds `{}` where the class name goes; CLIP_benchmark's `{c}` spelling is accepted and
rewritten to `{}`. Names are substituted with `str.replace`, not `str.format`, so braces in class
names or templates cannot break formatting.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from mmcl.utils import UserError

log = logging.getLogger("mmcl.eval")

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = ("openai", "short", "cifar", "none")


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {e}") from None
    return [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]


def parse_templates(lines: list[str], source: str = "templates") -> list[str]:
    """Validate templates: blank lines and `#` comments dropped, `{c}` -> `{}`, each must hold `{}`."""
    out = []
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("{c}", "{}")
        if "{}" not in line:
            raise UserError(f"{source}: line {i} has no '{{}}' placeholder for the class name: {line!r}")
        out.append(line)
    if not out:
        raise UserError(f"{source}: no templates (the file is empty)")
    return out


def load_templates(name_or_path: str | Path) -> list[str]:
    """Templates of a built-in set (`openai`, `short`, `cifar`, `none`) or of a file, one per line.

    Raises:
        UserError: unknown set name and no such file, an empty list, or a template without `{}`.
    """
    name = str(name_or_path)
    if name == "none":
        return ["{}"]
    if name in BUILTIN_TEMPLATES:
        path = TEMPLATE_DIR / f"{name}.txt"
    else:
        path = Path(name)
        if not path.is_file():
            raise UserError(
                f"unknown template set '{name}': not one of {', '.join(BUILTIN_TEMPLATES)} and no such file"
            )
    return parse_templates([line for _, line in _read_lines(path, "templates")], source=str(path))


def load_classnames(path: str | Path) -> list[str]:
    """Class names, one per line; line i (from 0) is class index i. Trailing blank lines are ignored.

    Duplicate names are allowed with a warning (OpenAI's cleaned ImageNet names repeat 'missile' and
    'sunglasses'), since indices, not names, are the labels.

    Raises:
        UserError: missing or empty file, or a blank line between names (it would shift every later index).
    """
    path = Path(path)
    lines = _read_lines(path, "classnames")
    while lines and not lines[-1][1]:
        lines.pop()
    if not lines:
        raise UserError(f"classnames file {path} is empty")
    for lineno, name in lines:
        if not name:
            raise UserError(f"classnames file {path}: line {lineno} is blank (one class name per line)")
    names = [name for _, name in lines]
    check_classnames(names, str(path))
    return names


def check_classnames(names: list[str], source: str = "classnames") -> None:
    """Warn about duplicate class names (two classes the text encoder cannot tell apart)."""
    dups = [n for n, c in Counter(names).items() if c > 1]
    if dups:
        log.warning(
            "%s: %d duplicate class names (e.g. %r); their classes get identical text embeddings",
            source,
            len(dups),
            dups[0],
        )


def format_prompts(classname: str, templates: list[str]) -> list[str]:
    """The prompts of one class: each template with `{}` replaced by the class name."""
    return [t.replace("{}", classname) for t in templates]
