"""`mmcl finetune`: pretrain a small CLIP on shapes, fine-tune it on the bundled digits (FLYP captions),
and check WiSE-FT: digits zero-shot rises far above the start, alpha 0.5 keeps most of the shapes accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmcl.cli import main
from mmcl.config import load_experiment
from mmcl.data.writer import make_demo_data, write_real_shards
from mmcl.engine.trainer import train
from mmcl.finetune import FLYP_FILE, FinetuneSpec, experiment_for, interpolate, write_class_prompts

QUIET = ["train.trackers=[none]", "train.progress=false", "data.num_workers=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a CPU shared with other jobs: one thread is much faster (two spin at OpenMP barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft_data")
    shapes = make_demo_data(root / "shapes", n_train=3000, n_val=300, image_size=32)
    write_real_shards(root / "digits-train", "digits", split="train", image_size=32, progress=False)
    write_real_shards(root / "digits-test", "digits", split="test", image_size=32, progress=False)
    return {"shapes": shapes, "digits_train": root / "digits-train", "digits_test": root / "digits-test"}


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_experiment(
        None,
        ["model.preset=clip-tiny-nfnet", *QUIET, f"data.train_shards=[{data['shapes'] / 'train'}]", "data.batch_size=64",
         "train.steps=100", "train.lr=2e-3", "train.warmup_steps=10", f"train.output_dir={out}"],
    )  # fmt: skip
    train(cfg)
    return out


def test_flyp_captions_are_made_by_the_loader_from_each_label(data, tmp_path: Path) -> None:
    """FLYP reads the shards in place (no copy): the caption key names the class prompts, and each sample read
    gets the prompts of its own class."""
    import webdataset as wds

    from mmcl.data.decode import CLASS_PROMPTS, SkipSample, caption_options, decode_json, decode_label

    names = (data["digits_train"] / "classnames.txt").read_text().split()
    key = write_class_prompts(names, ["a photo of a {}.", "the digit {}"], tmp_path / "f" / FLYP_FILE)
    assert key.startswith(CLASS_PROMPTS) and sorted(p.name for p in (tmp_path / "f").iterdir()) == [FLYP_FILE]
    shard = str(next(data["digits_train"].glob("*.tar")))
    for n, sample in enumerate(wds.WebDataset(shard, shardshuffle=False)):
        meta = decode_json(sample)
        word = names[decode_label(sample, meta, "label")]
        assert caption_options(sample, meta, key) == [f"a photo of a {word}.", f"the digit {word}"]
        if n == 20:
            break
    with pytest.raises(SkipSample, match="missing_label"):  # a sample without a label is skipped and counted
        caption_options({"jpg": b""}, {}, key)


def test_wise_ft_interpolates_floating_tensors() -> None:
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.ones(3), "n": torch.tensor(2)}
    mid = interpolate(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.full((3,), 0.25)) and int(mid["n"]) == 2


def test_finetune_options_reach_the_experiment(data, pretrained: Path, tmp_path: Path) -> None:
    spec = FinetuneSpec(start=str(pretrained), train_shards=[str(data["digits_train"])], out_dir=str(tmp_path / "ft"),
                        lock_image=True, unlocked_layers=1, layer_decay=0.7, templates="short")  # fmt: skip
    cfg = experiment_for(spec)
    assert cfg.model.init_from == str((pretrained / "final").resolve()) and cfg.model.image.timm_name == "test_nfnet"
    assert cfg.model.image.lock and cfg.model.image.unlocked_layers == 1 and not cfg.model.text.lock
    assert (
        cfg.train.layer_decay == 0.7
        and cfg.data.caption_key.endswith(FLYP_FILE)
        and cfg.data.train_shards == [str(data["digits_train"])]  # read in place
        and not (tmp_path / "ft" / "flyp_data").exists()
        and [t.name for t in cfg.loss.terms] in ([], ["clip"])  # [] = the model's default, [clip]
    )


def test_finetune_on_digits_with_wise_ft(data, pretrained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", str(pretrained), str(data["digits_train"]), *QUIET, "--out", str(out), "--steps", "60",
            "--lr", "5e-4", "--warmup-steps", "6", "--batch-size", "64", "--templates", "short", "--workers", "1",
            "--target", str(data["digits_test"]), "--reference", str(data["shapes"] / "val"),
            "--eval-templates", "short", "--wise-alphas", "0,0.5,1"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "wise_ft.json").read_text())["rows"]
    start, mid, end = rows
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert start["reference_top1"] > 0.12  # the start model learned shapes (40 classes, chance 2.5%)
    assert end["target_top1"] > start["target_top1"] + 0.3  # digits: far above the start (chance 10%)
    assert mid["reference_top1"] >= 0.6 * start["reference_top1"]  # WiSE-FT keeps most of the shapes accuracy
    assert mid["target_top1"] > start["target_top1"] + 0.08  # ... and gains on digits
    assert (out / "wise_ft.png").stat().st_size > 1000 and "| 0.50 |" in (out / "wise_ft.md").read_text()
    assert "WiSE-FT curve" in capsys.readouterr().out
