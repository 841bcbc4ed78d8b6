"""An mmcl checkpoint scores the same zero-shot numbers in mmcl and, after export, in open_clip's own tooling."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from mmcl.cli import main
from mmcl.config import load_experiment, save_yaml
from mmcl.engine.checkpoint import save_model
from mmcl.eval.datasets import open_eval_dataset
from mmcl.eval.runner import evaluate_zero_shot, run_zero_shot
from mmcl.eval.templates import load_classnames, load_templates
from mmcl.inference import load_pipeline
from mmcl.models import build_model


def test_exported_checkpoint_gives_the_same_zero_shot_numbers(demo_shards, tmp_path):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny"])
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_model(build_model(cfg.model), run / "final" / "model.safetensors")
    save_yaml(cfg, run / "final" / "config.yaml")
    assert main(["export", "open_clip", str(run), str(tmp_path / "oc")]) == 0

    classnames = load_classnames(demo_shards / "classnames.txt")
    templates = load_templates("short")
    val = str(demo_shards / "val")
    ours = evaluate_zero_shot(load_pipeline(run), open_eval_dataset(val), classnames, templates)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    model.eval()

    @torch.no_grad()
    def encode_images(images):
        return F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)

    @torch.no_grad()
    def encode_texts(texts):
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)

    theirs = run_zero_shot(encode_images, encode_texts, open_eval_dataset(val), classnames, templates)
    assert ours["metrics"]["n_samples"] == theirs["metrics"]["n_samples"] == 128
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert ours["metrics"][key] == theirs["metrics"][key], key
    assert [p["pred"] for p in ours["predictions"]] == [p["pred"] for p in theirs["predictions"]]
