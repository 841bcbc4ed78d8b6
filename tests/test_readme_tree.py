"""README's tree is true: every path it lists exists, and every module of the package is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_block() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## The tree\n.*?```\n(.*?)```", text, flags=re.S).group(1)


def listed_paths(block: str) -> list[str]:
    """Paths named in the tree: a folder line opens a level (by indentation); `a.py, b.py` lines list files."""
    stack: list[tuple[int, str]] = []
    out = []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+(?:, \S+)*)(?:\s{2,}|$)", line)
        if not m or not re.search(r"[./]", m.group(2)) or m.group(2).startswith("`"):
            continue
        indent, names = len(m.group(1)), m.group(2)
        if len(line) - len(line.lstrip()) >= 20:  # a description's continuation line
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = "".join(p for _, p in stack)
        for name in names.split(", "):
            out.append(prefix + name)
        if names.endswith("/"):
            stack.append((indent, names))
    return out


def test_every_listed_path_exists():
    paths = listed_paths(tree_block())
    assert len(paths) > 60
    missing = [p for p in paths if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"README's tree lists what does not exist: {missing}"


def test_every_module_is_in_the_tree():
    listed = set(listed_paths(tree_block()))
    modules = [p for p in (ROOT / "mmcl").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    absent = [str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in listed]
    assert not absent, f"modules missing from README's tree: {absent}"


def test_the_sample_path_paragraph_is_counted_from_the_code(tmp_path):
    """README's "one sample" paragraph gives the counts `python -m bench.sample_path` measures on a one-step
    `mmcl train`. In a fresh interpreter, as a user runs it: in this one, functions that run once per process
    (caches, lazy registries) may already have run in earlier tests and would drop out of the count."""
    import json
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "bench.sample_path", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    res = json.loads((tmp_path / "sample_path.json").read_text())
    text = " ".join((ROOT / "README.md").read_text().split())
    claim = (
        f"{len(res['files'])} mmcl files and {res['named_functions']} functions ({len(res['functions'])} counting "
        f"comprehensions) are entered. The loss value is computed {res['loss_calls_below_loop']} mmcl calls below "
        f"the loop"
    )
    assert claim in text, res["files"]
    assert f"the tar is read {res['read_calls_below_loop']} below it (plus {res['read_torch_frames']} frames" in text
    for file in res["files"]:  # every file the sample enters is named in the paragraph
        assert f"{file.split('/')[-1]}`" in text, file
