"""bench/gpu_check.sh cannot rot before a GPU arrives: its --smoke run goes end to end on CPU and writes every
row; without CUDA every row says it was skipped and why; the peak lookup and the FLOP count are right."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench.gpu_check import _count_flops, peak_tflops

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    "train ViT-B/32 mmcl compile=off",
    "train ViT-B/32 open_clip compile=off",
    "train ViT-B/16 mmcl compile=off",
    "train ViT-B/16 open_clip compile=off",
    "loader 224px decode_on=workers",
    "loader 224px decode_on=device",
    "device decode only 224px",
    "train ViT-B/32 mmcl compile=on",
    "train ViT-B/32 open_clip compile=on",
    "train ViT-B/16 mmcl compile=on",
    "train ViT-B/16 open_clip compile=on",
]


def run_check(out: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), *args, str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_smoke_runs_every_row_end_to_end(tmp_path: Path) -> None:
    result, stdout = run_check(tmp_path / "out", "--smoke", "--peak-tflops", "1.0")
    assert result["complete"] and result["smoke"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["note"])
        assert f"| {name} | ok |" in stdout  # the table shows every row
        assert row["samples_per_s"] > 0, name
    for name, row in rows.items():
        if name.startswith("train"):
            # the compiled row's FLOPs are its eager twin's (same model, same step)
            assert row["flops_per_step"] == rows[name.replace("compile=on", "compile=off")]["flops_per_step"] > 0
            assert row["step_ms"] > 0
            assert row["mfu"] == pytest.approx(row["flops_per_step"] / (row["step_ms"] / 1000) / 1e12, rel=0.02)
            assert row["samples_per_s"] == pytest.approx(result["batch_size"] / (row["step_ms"] / 1000), rel=0.01)
    for name in ("loader 224px decode_on=device", "device decode only 224px"):
        assert rows[name]["extra"]["parity_224px"]["ok"], rows[name]["extra"]
    assert set(result["targets"]) == {
        f"ViT-B/{p} compile={c} mmcl/open_clip" for p in (32, 16) for c in ("off", "on")
    } | {"ViT-B/32 mmcl MFU"}


def test_without_cuda_every_row_is_skipped_with_the_reason(tmp_path: Path) -> None:
    result, stdout = run_check(tmp_path / "out", env={"CUDA_VISIBLE_DEVICES": ""})
    assert [r["name"] for r in result["rows"]] == ROWS
    for row in result["rows"]:
        assert row["status"] == "skipped" and "no CUDA" in row["note"], row
        assert f"| {row['name']} | skipped |" in stdout


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
     ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("Some Future GPU", None)],
)  # fmt: skip
def test_peak_from_the_device_name(name: str, tflops: float | None) -> None:
    assert peak_tflops(name, None) == tflops
    assert peak_tflops(name, 123.0) == 123.0


def test_flops_of_a_training_step_are_the_matmuls_forward_and_backward() -> None:
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    # forward 2*B*in*out; backward: the input's and the weight's gradients, as much again each
    assert _count_flops(step) == 3 * 2 * 8 * 32 * 16
