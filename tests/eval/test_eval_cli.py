"""`mmcl eval` end to end with a fake `mmcl.inference.load_pipeline` (the real one needs a trained run)."""

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import HashTextEncoder, TableImageEncoder, labelled_members, write_tar

import mmcl.cli
from mmcl.eval.datasets import open_eval_dataset
from mmcl.eval.runner import run_captioning, run_zero_shot
from mmcl.eval.templates import load_templates


class FakePipeline:
    can_encode = can_caption = True

    def __init__(self):
        self.encode_images = TableImageEncoder(
            F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
        )
        self.encode_texts = HashTextEncoder(8)
        self.generate_kwargs = []

    def caption(self, images, **gen):
        self.generate_kwargs.append(gen)
        return ["caption of image 3"] * len(images)


@pytest.fixture
def cli(monkeypatch, tmp_path):
    loaded = []

    def load_pipeline(path):
        loaded.append(path)
        return FakePipeline()

    monkeypatch.setitem(sys.modules, "mmcl.inference", types.SimpleNamespace(load_pipeline=load_pipeline))
    monkeypatch.setattr(mmcl.cli, "COMMANDS", {"eval": "mmcl.cli.eval"})  # other commands may be mid-build
    (tmp_path / "run").mkdir()
    shards = tmp_path / "data"
    write_tar(shards / "0.tar", labelled_members(list(range(12)), [i % 3 for i in range(12)]))
    (shards / "classnames.txt").write_text("cat\ndog\nbird\n")

    def run(*argv):
        return mmcl.cli.main(list(argv))

    run.loaded, run.run_dir, run.shards = loaded, str(tmp_path / "run"), str(shards / "0.tar")
    return run


def test_zeroshot_command_writes_the_library_result(cli, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(
        "eval",
        "zeroshot",
        cli.run_dir,
        "--shards",
        cli.shards,
        "--templates",
        "short",
        "--out",
        str(out),
        "--batch-size",
        "5",
        "--quiet",
    )
    assert rc == 0 and cli.loaded == [cli.run_dir]
    summary = json.loads((out / "eval.json").read_text())
    ds = open_eval_dataset(cli.shards)
    p = FakePipeline()
    ref = run_zero_shot(p.encode_images, p.encode_texts, ds, ds.classnames, load_templates("short"))
    assert summary["metrics"] == ref["metrics"]
    assert summary["settings"]["templates"] == "short"
    assert "top1" in capsys.readouterr().out
    assert (out / "confusion.png").is_file()


def test_default_output_folder_and_captions(cli, tmp_path):
    assert cli("eval", "captions", cli.run_dir, "--shards", cli.shards, "--num-beams", "2", "--quiet") == 0
    summary = json.loads((tmp_path / "run" / "eval" / "captions" / "eval.json").read_text())
    ref = run_captioning(lambda ims: ["caption of image 3"] * len(ims), open_eval_dataset(cli.shards))
    assert summary["metrics"] == ref["metrics"] and summary["settings"]["num_beams"] == 2
    assert cli("eval", "retrieval", cli.run_dir, "--shards", cli.shards, "--ks", "1", "2", "--quiet") == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "retrieval" / "eval.json").read_text())["metrics"]
    assert set(metrics) >= {"i2t_recall@1", "t2i_recall@2", "t2i_median_rank"}


def test_user_errors_are_one_line(cli, tmp_path, capsys):
    (tmp_path / "data" / "classnames.txt").unlink()
    assert cli("eval", "zeroshot", cli.run_dir, "--shards", cli.shards) == 2
    assert "no class names" in capsys.readouterr().err
    assert cli("eval", "zeroshot", cli.run_dir, "--shards", cli.shards, "--classnames", "nope.txt") == 2
    assert "classnames file not found: nope.txt" in capsys.readouterr().err
    assert cli("eval", "retrieval", cli.run_dir, "--shards", str(tmp_path / "missing-*.tar")) == 2
    assert "no shard found" in capsys.readouterr().err
    assert cli.loaded == []  # input is checked before the model is loaded


@pytest.mark.parametrize("task, workers", [("zeroshot", "0"), ("retrieval", "2")])
def test_damaged_tars_among_the_shards_are_skipped_counted_and_reported(cli, tmp_path, capsys, task, workers):
    """A 0-byte and a truncated tar beside a good one: the eval runs on the good samples and says what it skipped."""
    data = tmp_path / "data"
    (data / "1.tar").write_bytes(b"")
    good = write_tar(tmp_path / "full.tar", labelled_members(list(range(12, 16)), [0, 1, 2, 0])).read_bytes()
    (data / "2.tar").write_bytes(good[: 2 * 512 + 100])  # inside the data of the second member
    out = tmp_path / "report"
    rc = cli("eval", task, cli.run_dir, "--shards", str(data), "--out", str(out), "--workers", workers, "--quiet")
    assert rc == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["skipped"] == {"unreadable_tar": 2}
    assert summary["metrics"]["n_samples" if task == "zeroshot" else "n_images"] == 12  # the good tar's samples
    assert "2 unreadable_tar" in (out / "eval.md").read_text() and "2 unreadable_tar" in capsys.readouterr().out


def test_reports_of_a_model_that_is_not_a_run_go_to_the_current_folder(cli, tmp_path, monkeypatch):
    """A transformers or open_clip folder (or a hub name) is the user's, not ours to write a report into."""
    hf = tmp_path / "tiny-hf-clip"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for model in (str(hf), "hf:org/tiny-clip"):
        assert cli("eval", "retrieval", model, "--shards", cli.shards, "--quiet") == 0
    assert (tmp_path / "eval" / "tiny-hf-clip" / "retrieval" / "eval.json").is_file()
    assert (tmp_path / "eval" / "org_tiny-clip" / "retrieval" / "eval.json").is_file()
    assert not (hf / "eval").exists()
