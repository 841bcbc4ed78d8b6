"""Model cards ready for the Hub (issue 19): base_model, model-index with the eval results, license_name, no
absolute local path, a real summary of built-in data, the model's name as the title."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mmcl.model_card import public_path, write_model_card

HUB_PATH = "/root/.cache/huggingface/hub/models--openai--clip-vit-base-patch32/snapshots/0123abcd"


def _run(tmp_path: Path, init_from: str) -> Path:
    run = tmp_path / "digits-ft"
    run.mkdir()
    cfg = {
        "model": {"arch": "clip", "init_from": init_from, "image": {"kind": "hf_clip", "hf_name": init_from}},
        "data": {"train_shards": ["builtin:shapes/train", str(tmp_path / "gone" / "train")],
                 "caption_key": f"class_prompts:{run / 'flyp_captions.json'}"},
        "eval": {"shards": ["builtin:shapes/val"]},
        "train": {"output_dir": str(run), "steps": 10},
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 10, "loss": 1.0}, {"step": 10, "eval_zeroshot_top1": 0.625, "eval_i2t_recall@1": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_card_is_hub_ready(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import ModelCard

    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))  # built-in data not written here
    run = _run(tmp_path, HUB_PATH)
    out = tmp_path / "exported"
    out.mkdir()
    write_model_card(out, run / "config.yaml", "transformers", "usage")
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.license == "other" and card.data.license_name
    results = {r.metric_name: (r.task_type, r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert results["zeroshot_top1"] == ("zero-shot-image-classification", "accuracy", 0.625)
    assert results["i2t_recall@1"][1:] == ("recall", 0.5)
    assert "model-index" in text and card.data.model_name == "digits-ft"
    assert text.split("---", 2)[2].lstrip().startswith("# digits-ft\n")  # the model's name, not `# exported`
    assert str(tmp_path) not in text and "/root" not in text  # no absolute local path anywhere
    assert "? shard" not in text and "sample count unknown" not in text
    assert "synthetic images of coloured shapes (32 px) with generated captions, 40 classes" in text
    assert "20,000 samples" in text and "class name in prompt templates" in text


def test_a_local_start_is_named_without_its_path(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    run = _run(tmp_path, str(tmp_path / "runs" / "clip-tiny" / "final"))
    write_model_card(tmp_path, run / "config.yaml", "open_clip", "usage", license="mit", model_name="my-clip")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and card.data.license_name is None  # no hub id to point at
    assert "Fine-tuned from `clip-tiny/final`" in card.text and "# my-clip" in card.text
    assert str(tmp_path) not in (tmp_path / "README.md").read_text()


def test_public_path_keeps_urls_and_relative_paths() -> None:
    assert public_path("http://host:8000/s/{0..3}.tar") == "http://host:8000/s/{0..3}.tar"
    assert public_path("data/demo/train") == "data/demo/train"
    assert public_path(HUB_PATH) == "openai/clip-vit-base-patch32"


def test_card_reads_a_history_cut_by_a_kill(tmp_path: Path) -> None:
    """The card reads metrics.jsonl as the trainer does (`run_folder.read_metrics`): a last line cut mid-write is
    left out, the last complete eval row is reported."""
    from huggingface_hub import ModelCard

    run = _run(tmp_path, HUB_PATH)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "eval_zeroshot_top1": 0.9')  # killed while writing this row
    (run / "final").mkdir()
    (run / "final" / "config.yaml").write_text((run / "config.yaml").read_text())
    out = tmp_path / "exported"
    out.mkdir()
    write_model_card(out, run / "final" / "config.yaml", "transformers", "usage")  # from the run's final/
    results = {r.metric_name: r.metric_value for r in ModelCard.load(out / "README.md").data.eval_results}
    assert results["zeroshot_top1"] == 0.625
