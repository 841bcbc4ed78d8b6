"""FSDP checkpoints on 2 gloo processes: a task sharded as Accelerate's FSDP2 shards it (`fully_shard` on every
transformer block, then the root) trains as one unsharded process does on the whole batch (2 micro-batches
per step, the feature cache), checkpoints through the trainer's own FSDP branch (`Trainer._save` ->
`mmcl.engine.fsdp`), and a fresh task resumed by `Trainer._restore` continues the exact same loss curve. The
files are safetensors and JSON only, written atomically with the manifest last; a damaged newest checkpoint
falls back to the previous one; model.safetensors and task_state.safetensors load into a plain task.

Needs CUDA, so not run here: Accelerate's own FSDP wrapping (`accelerate launch --config_file
configs/accelerate/fsdp.yaml`, i.e. `Trainer.__init__`'s `accelerator.prepare` under FSDP): Accelerate refuses
FSDP on CPU (with `cpu=True` it falls back to DDP) and FSDP1 needs an accelerator device. torch's FSDP2 runs
on CPU with gloo, so this test applies the same `fully_shard` calls itself, with `fsdp.prepare` before and
`fsdp.after_wrap` after them, as the trainer does around `accelerator.prepare`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.shards import StreamState
from mmcl.engine import checkpoint as ckpt
from mmcl.engine import fsdp
from mmcl.engine.optim import build_optimizer, lr_at, set_lr
from mmcl.engine.trainer import Trainer
from mmcl.models import build_model
from mmcl.tasks import Task, build_task
from mmcl.utils import UserError

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
PER_RANK = 4
LAYERS = ("Block", "TextBlock")  # = fsdp_transformer_layer_cls_to_wrap in configs/accelerate/fsdp.yaml
OVERRIDES = ["model.preset=clip-tiny", "loss.terms=[clip, {name: simclr, weight: 0.5}]", "train.lr=1e-2",
             "train.warmup_steps=2", "train.steps=6"]  # fmt: skip


def make_task(seed: int) -> tuple[Task, object]:
    torch.manual_seed(seed)
    cfg = load_experiment(None, OVERRIDES)
    return build_task(build_model(cfg.model), cfg), cfg


def shard(task: Task) -> Task:
    """What Accelerate's FSDP2 preparation does with TRANSFORMER_BASED_WRAP: each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fsdp.prepare(task)  # mmcl's Trainer does this before building the optimizer under FSDP
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in list(task.modules()):
        if type(module).__name__ in LAYERS:
            fully_shard(module, mesh=mesh)
    fully_shard(task, mesh=mesh)
    fsdp.after_wrap(task)  # and this after accelerator.prepare
    return task


def batch_for(task: Task, step: int, rank: int | None) -> Batch:
    """A fixed global batch per step; this rank's half of it (None: all of it)."""
    g = torch.Generator().manual_seed(1000 + step)
    n = PER_RANK * WORLD
    size = task.model.preprocess_cfg()["image_size"]
    images = torch.randn(n, 3, size, size, generator=g)
    captions = [f"a {['red', 'green', 'blue'][(i + step) % 3]} thing number {i}" for i in range(n)]
    ids, mask = task.model.tokenizer(captions)
    own = slice(None) if rank is None else slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batch = Batch(images=images[own], text=ids[own], text_mask=mask[own], captions=captions[own])
    for name, view in task.views().items():  # simclr's second view: drawn from the step's generator
        if view.kind == "sample":
            batch.views[name] = images[own].flip(-1)
    return batch


def train_steps(task: Task, optimizer, cfg, first: int, last: int, rank: int | None) -> list[float]:
    """Steps first+1..last as the trainer's loop runs them (gradient accumulation over 2 micro-batches); the global
    mean loss of each."""
    losses = []
    for step in range(first, last):
        set_lr(optimizer, lr_at(step, cfg.train))
        out = task.step(batch_for(task, step, rank).split(2)).metrics  # 2 micro-batches: the feature cache
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.tensor(out["loss"], dtype=torch.float64)
        if rank is not None:
            dist.all_reduce(loss)
            loss /= WORLD
        losses.append(float(loss))
    return losses


class TrainerParts:
    """What `Trainer._save` and `Trainer._restore` read from the trainer, over the gloo group: the test runs the
    trainer's own FSDP branch of both (Accelerate, which would build the real object, needs CUDA for FSDP)."""

    def __init__(self, task: Task, optimizer, cfg, root: Path, rank: int) -> None:
        self.task, self.optimizer, self.cfg, self.tc, self.fsdp = task, optimizer, cfg, cfg.train, True
        self.run_dir, self.ckpt_root = root, root / "checkpoints"
        self.accelerator = SimpleNamespace(
            process_index=rank, num_processes=WORLD, is_main_process=rank == 0, wait_for_everyone=dist.barrier
        )

    def save(self, step: int, rank: int) -> None:
        state = StreamState()
        state.epoch = step + 10 * rank  # something of this rank's to get back
        Trainer._save(self, step, SimpleNamespace(state=state), {"bad_in_a_row": 0, "bad_total": step})

    def restore(self) -> tuple[int, StreamState, dict]:
        return Trainer._restore(self)


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    root_dir = Path(root) / "checkpoints"
    try:
        # run A: six steps, checkpoints after steps 3 and 5
        task, cfg = make_task(seed=0)
        shard(task)
        assert fsdp.is_sharded(task)
        optimizer = build_optimizer(task, cfg.train)
        trainer = TrainerParts(task, optimizer, cfg, Path(root), rank)
        curve = train_steps(task, optimizer, cfg, 0, 3, rank)
        trainer.save(3, rank)
        curve += train_steps(task, optimizer, cfg, 3, 5, rank)
        trainer.save(5, rank)
        curve += train_steps(task, optimizer, cfg, 5, 6, rank)
        final_a, _ = fsdp.gather_full_state(task, optimizer)
        # the sharded run trains as one process on the whole batch does (the same loop, no FSDP)
        reference = json.loads(Path(root, "reference.json").read_text())
        assert curve == pytest.approx(reference, rel=1e-4), (curve, reference)

        # run B: a fresh task (other initial weights), resumed from step 3, to step 6
        task_b, _ = make_task(seed=1)
        shard(task_b)
        optimizer_b = build_optimizer(task_b, cfg.train)
        trainer_b = TrainerParts(task_b, optimizer_b, cfg, Path(root), rank)
        if rank == 0:  # the newest checkpoint is set aside: the trainer resumes from step 3
            ckpt.step_dir(root_dir, 5).rename(Path(root) / "set_aside")
        dist.barrier()
        step, data_state, counters = trainer_b.restore()
        assert (step, data_state.epoch, counters["bad_total"]) == (3, 3 + 10 * rank, 3)
        dist.barrier()
        if rank == 0:
            (Path(root) / "set_aside").rename(ckpt.step_dir(root_dir, 5))
        resumed = train_steps(task_b, optimizer_b, cfg, 3, 6, rank)
        assert resumed == curve[3:], (resumed, curve)  # exact: the same floats, step by step
        final_b, _ = fsdp.gather_full_state(task_b, optimizer_b)
        if rank == 0:
            assert final_a.keys() == final_b.keys()
            for k in final_a:
                assert torch.equal(final_a[k], final_b[k]), k
            Path(root, "curve.json").write_text(json.dumps(curve))
        # a checkpoint of another model is refused in one line
        other = load_experiment(None, [*OVERRIDES[:1], "model.embed_dim=48", *OVERRIDES[1:]])
        torch.manual_seed(0)
        task_c = shard(build_task(build_model(other.model), other))
        with pytest.raises(UserError, match="do not match the model config"):
            fsdp.load(task_c, build_optimizer(task_c, other.train), ckpt.step_dir(root_dir, 3))
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_fsdp_checkpoint_resumes_the_exact_curve(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task, cfg = make_task(seed=0)  # the reference: one process, the whole batch, no sharding
    reference = train_steps(task, build_optimizer(task, cfg.train), cfg, 0, 6, rank=None)
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    assert len(json.loads((tmp_path / "curve.json").read_text())) == 6
    root = tmp_path / "checkpoints"
    steps = ckpt.list_checkpoints(root)
    assert [p.name for p in steps] == ["step_0000003", "step_0000005"]
    assert not list(root.glob(".*.tmp"))  # the temp folders were renamed into place
    for directory in steps:
        names = {p.name for p in directory.iterdir()}
        assert names == {"model.safetensors", "task_state.safetensors", "optimizer.safetensors", "optimizer.json",
                         "trainer.json", "rank0.json", "rank1.json", "rank0_rng.pt", "rank1_rng.pt",
                         "manifest.json"}  # fmt: skip
        manifest = json.loads((directory / "manifest.json").read_text())["files"]
        assert set(manifest) == names - {"manifest.json"}
        # the manifest is written last: every file it lists is older than or as old as it
        assert all(
            (directory / n).stat().st_mtime_ns <= (directory / "manifest.json").stat().st_mtime_ns for n in manifest
        )
        assert ckpt.verify_checkpoint(directory) is None
        # the optimizer: moments of every parameter by name, hyper-parameters in JSON, nothing pickled
        meta = json.loads((directory / "optimizer.json").read_text())
        tensors = ckpt.load_file(str(directory / "optimizer.safetensors"))
        names_in_groups = {n for g in meta["param_groups"] for n in g["params"]}
        assert {k.split("/")[1] for k in tensors} == names_in_groups
        assert {k.split("/")[2] for k in tensors} == {"exp_avg", "exp_avg_sq", "step"}

    # model.safetensors is the full model and task_state.safetensors the terms': they load into a plain,
    # unsharded task with the DDP path's readers (inference, export)
    task, _ = make_task(seed=5)
    ckpt.load_model_weights(task.model, steps[0] / "model.safetensors")
    ckpt.load_task_state(task, steps[0])
    full, _ = fsdp.read_full_state(steps[0])
    for k, v in task.state_dict().items():
        assert torch.equal(v, full[k]), k

    # a damaged newest checkpoint: the previous complete one is used, with a warning naming the problem
    with (steps[1] / "optimizer.safetensors").open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with caplog.at_level("WARNING"):
        assert ckpt.newest_valid_checkpoint(root) == steps[0]
    assert "optimizer.safetensors does not match its SHA-256" in caplog.text


def test_optimizer_state_round_trips_through_tensors_and_json() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    tensors, meta = fsdp.flatten_optimizer(state)
    back = fsdp.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()
    for name, slots in state["state"].items():
        for slot, value in slots.items():
            assert torch.equal(back["state"][name][slot], value)


def test_accelerate_fsdp_profile_wraps_the_blocks_mmcl_builds() -> None:
    """The profile is FSDP2 with full state dicts, and its layer classes exist in mmcl's towers (a class name that
    matches nothing would leave the model as one unsharded unit)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / "accelerate" / "fsdp.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16"
    fsdp_config = yaml.safe_load(path.read_text())["fsdp_config"]
    assert fsdp_config["fsdp_version"] == 2
    assert fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    wrapped = set(fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped == set(LAYERS)
    task, _ = make_task(seed=0)
    assert wrapped <= {type(m).__name__ for m in task.modules()}
