"""SugarCrepe's files as they may arrive: hostile JSON is one line naming the file, a bad image is skipped and
counted while every other pair is still scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmcl.cli
from mmcl.eval.compositional import sugarcrepe_pairs
from mmcl.utils import UserError


def _sugarcrepe(root: Path, entries: dict) -> tuple[Path, Path]:
    data, images = root / "data", root / "val2017"
    data.mkdir(parents=True)
    images.mkdir()
    (data / "replace_att.json").write_text(json.dumps(entries))
    return data, images


def _entry(name: str, colour: str = "red") -> dict[str, str]:
    return {"filename": name, "caption": f"a {colour} square", "negative_caption": "a blue square"}


def test_json_nested_too_deep_is_one_line(tmp_path):
    data, images = _sugarcrepe(tmp_path, {})
    (data / "replace_att.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError) as e:
        sugarcrepe_pairs(data, images)
    assert str(data / "replace_att.json") in str(e.value) and "\n" not in str(e.value)


def test_a_nul_in_a_file_name_is_one_line(tmp_path):
    data, images = _sugarcrepe(tmp_path, {"0": _entry("0001.jpg\x00.png")})
    Image.new("RGB", (8, 8)).save(images / "0001.jpg")
    with pytest.raises(UserError) as e:
        sugarcrepe_pairs(data, images)
    assert "replace_att.json" in str(e.value) and "'0'" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    from mmcl.config import load_experiment, save_yaml
    from mmcl.engine.checkpoint import save_model
    from mmcl.models import build_model

    cfg = load_experiment(None, ["model.preset=clip-tiny"])
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_yaml(cfg, run / "config.yaml")
    torch.manual_seed(0)
    save_model(build_model(cfg.model), run / "final" / "model.safetensors")
    return run


def test_an_unreadable_image_is_skipped_and_counted_not_fatal(tmp_path, tiny_run, capsys):
    names = [f"{i:04d}.jpg" for i in range(5)]
    data, images = _sugarcrepe(tmp_path, {str(i): _entry(n) for i, n in enumerate(names)})
    for n in names:
        Image.new("RGB", (40, 40), (200, 30, 30)).save(images / n, quality=95)
    (images / names[1]).write_bytes(b"<html>not found</html>")  # not an image at all
    noise = Image.effect_noise((200, 200), 60).convert("RGB")
    noise.save(images / names[3], quality=95)
    good = (images / names[3]).read_bytes()
    (images / names[3]).write_bytes(good[: len(good) // 2])  # a whole header, then the data cut short
    out = tmp_path / "report"
    rc = mmcl.cli.main(
        ["eval", "compositional", str(tiny_run), "--sugarcrepe", str(data), "--images", str(images)]
        + ["--out", str(out), "--quiet"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    summary = json.loads((out / "eval.json").read_text())
    assert summary["metrics"]["n_pairs"] == 3  # the pairs of the three readable images
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["image"] for p in predictions) == [names[0], names[2], names[4]]
    assert summary["skipped"] == {"not_an_image": 1, "corrupt_image": 1}
    assert "skipped: 1 corrupt_image, 1 not_an_image" in printed
