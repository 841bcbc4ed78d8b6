"""InstDisc's memory bank kept bounded (Wu et al. 2018): fp16 or fp32 entries, the bank in a memmap file off the
accelerator that trains exactly like the in-memory one and round-trips through the checkpoint, one file per process
under 2 gloo processes, and key collisions counted (a metric) instead of silent."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.engine.checkpoint import TASK_STATE, load_task_state
from mmcl.losses.base import StepContext
from mmcl.losses.instdisc import key_fingerprint, key_slot
from mmcl.models import build_model
from mmcl.tasks import build_task

OPTIONS = "name: instdisc, bank_size: 48, dim: 8, negatives: 6"


def _task(options: str = OPTIONS):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms=[clip, {{{options}}}]"])
    return build_task(build_model(cfg.model), cfg)


def _batch(task, step: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(step)
    size = task.model.preprocess_cfg()["image_size"]
    ids, mask = task.model.tokenizer([f"sample {i}" for i in range(n)])
    keys = [f"{(step * 5 + i) % 20:06d}" for i in range(n)]  # keys come back across steps
    return Batch(images=torch.randn(n, 3, size, size, generator=g), text=ids, text_mask=mask, keys=keys)


def _train(task, steps: int, start: int = 0) -> list[float]:
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        out = task.step(_batch(task, step).split(2))
        optimizer.step()
        task.on_step_end(StepContext(step=step + 1, features=out.features))
        losses.append(out.metrics["instdisc_loss"])
    return losses


def test_the_bank_on_disk_trains_exactly_like_the_bank_in_memory(tmp_path: Path) -> None:
    memory, disk = _task(), _task(f"{OPTIONS}, bank_file: {tmp_path / 'bank.npy'}")
    term = disk.terms["instdisc"]
    assert "bank" not in dict(term.named_buffers()) and "bank" in dict(memory.terms["instdisc"].named_buffers())
    assert _train(disk, 3) == _train(memory, 3)
    table = term.table()
    assert table.device.type == "cpu" and table.dtype == torch.float16
    assert torch.equal(table, memory.terms["instdisc"].bank)
    on_disk = np.load(tmp_path / "bank.npy", mmap_mode="r")  # a plain .npy file, the bank's rows
    assert on_disk.shape == (48, 8) and np.array_equal(on_disk, table.numpy())


def test_the_bank_on_disk_resumes_from_the_checkpoint_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    straight = _task(f"{OPTIONS}, bank_file: {tmp_path / 'a.npy'}")
    expected = _train(straight, 4)
    first = _task(f"{OPTIONS}, bank_file: {tmp_path / 'b.npy'}")
    _train(first, 2)
    state = first.state_for_checkpoint()
    assert torch.equal(state["terms.instdisc.bank"], first.terms["instdisc"].table())  # the bank is task state
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(ckpt / TASK_STATE))  # as the trainer
    model_state = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = _task(f"{OPTIONS}, bank_file: {tmp_path / 'c.npy'}")  # a new process: a fresh file
    resumed.model.load_state_dict(model_state)
    load_task_state(resumed, ckpt)
    assert torch.equal(resumed.terms["instdisc"].table(), first.terms["instdisc"].table())
    assert _train(resumed, 2, start=2) == pytest.approx(expected[2:], rel=1e-5)


def test_a_float32_bank() -> None:
    term = _task(f"{OPTIONS}, bank_dtype: float32").terms["instdisc"]
    assert term.bank.dtype == torch.float32 and term.bank.norm(dim=-1).sub(1).abs().max() < 1e-6


def test_collisions_are_counted_and_reported() -> None:
    task = _task("name: instdisc, bank_size: 4, dim: 8, negatives: 2")
    term = task.terms["instdisc"]
    owner, expected = {}, 0
    for step in range(3):
        batch = _batch(task, step)
        feats = term.features(task.model, batch, {})
        out = term(feats, batch)
        assert out["collisions"].item() == expected  # reported as a metric
        for key in batch.keys:
            slot, who = key_slot(key, 4), key_fingerprint(key)
            expected += slot in owner and owner[slot] != who
            owner[slot] = who
        step_rows = {f"instdisc/{k}": feats[k].detach() for k in ("v", "slot", "owner")}
        task.on_step_end(StepContext(step + 1, features=step_rows))
        assert int(term.collisions) == expected
    assert expected > 0  # 20 keys in 4 slots
    assert {"terms.instdisc.collisions", "terms.instdisc.owner"} <= set(task.state_for_checkpoint())
    big = _task("name: instdisc, bank_size: 4096, dim: 8, negatives: 2")  # the same keys, room for each
    feats = big.terms["instdisc"].features(big.model, _batch(big, 0), {})
    big.on_step_end(StepContext(1, features={f"instdisc/{k}": feats[k].detach() for k in ("v", "slot", "owner")}))
    assert int(big.terms["instdisc"].collisions) == 0


WORLD = 2


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        task = _task(f"{OPTIONS}, bank_file: {folder}/bank.npy")

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        batch = _batch(task, 0, n=8)
        own = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
        mine = Batch(images=batch.images[own], keys=batch.keys[own])
        feats = task.terms["instdisc"].features(task.model, mine, {})
        rows = {f"instdisc/{k}": feats[k].detach() for k in ("v", "slot", "owner")}
        task.on_step_end(StepContext(1, rank, WORLD, gather, rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_one_identical_bank_file_each(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    banks = [np.load(tmp_path / f"bank.npy.rank{r}") for r in range(WORLD)]
    assert np.array_equal(banks[0], banks[1])  # every rank applied every rank's rows, once
    single = _task()  # one process applying the whole batch: the same bank
    batch = _batch(single, 0, n=8)
    feats = single.terms["instdisc"].features(single.model, batch, {})
    single.on_step_end(StepContext(1, features={f"instdisc/{k}": feats[k].detach() for k in ("v", "slot", "owner")}))
    np.testing.assert_allclose(banks[0].astype(np.float32), single.terms["instdisc"].bank.float().numpy(), atol=1e-3)


def test_the_shipped_disk_config_keeps_its_bank_in_the_run_folder() -> None:
    cfg = load_experiment(Path(__file__).resolve().parents[2] / "configs/objectives/instdisc-disk.yaml", [])
    options = next(t for t in cfg.loss.terms if t.name == "instdisc").options
    assert Path(options.bank_file).parent == Path(cfg.train.output_dir)
