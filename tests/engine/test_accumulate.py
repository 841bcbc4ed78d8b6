"""The one accumulator: for every shipped term and a mix, k micro-batches give the full-batch gradient
(every negative kept), dropout is replayed, and the DDP version on 2 gloo processes agrees."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_runner import check_ddp_step

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.synthetic import generate
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.data.transforms import transform_from_model
from mmcl.losses.queue import FeatureQueue
from mmcl.models import build_model
from mmcl.tasks import Task, build_task
from mmcl.tasks.setups import all_setups

COLOURS = ["red", "green", "blue", "white"]
SHAPES = ["circle", "square", "star", "cross"]
CAPTIONS = [f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} number {i}" for i in range(16)]

# (model preset, loss.terms, extra overrides): every registered term's own toy setup (`LossTerm.test_setup`,
# read through the registry: a new term is covered here without an edit), and two mixes
SETUPS = {name: (s.preset, s.terms, tuple(s.overrides)) for name, s in all_setups().items()} | {
    "clip+caption": ("joint-tiny", "[{name: clip, weight: 0.7}, {name: caption, weight: 2.0}]", ()),
    "mix": ("clip-tiny", "[clip, {name: simclr, weight: 0.5}, nnclr, byol, {name: negclip, weight: 0.3}]", ()),
    "simclrv2": ("clip-tiny", "[clip, {name: simclr, momentum: 0.9, queue_size: 16}]", ()),
    "esimcse": ("clip-tiny", "[clip, {name: simcse, repetition: 0.32, queue_size: 16}]", ("model.text.dropout=0.1",)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accum_tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(CAPTIONS * 5, vocab_size=100, min_frequency=1), path)
    return path


def make_task(preset: str, terms: str, tok: Path | None = None, *extra: str) -> Task:
    torch.manual_seed(0)
    overrides = [f"model.preset={preset}", f"loss.terms={terms}", *extra]
    if tok is not None and preset in ("prefixlm-tiny", "joint-tiny"):
        overrides += [f"model.text.tokenizer={tok}", "model.text.vocab_size=100"]
    cfg = load_experiment(None, overrides)
    task = build_task(build_model(cfg.model), cfg)
    for module in task.modules():  # queues start empty; fill them so their negatives / neighbours are exercised
        if isinstance(module, FeatureQueue):
            module.push(torch.nn.functional.normalize(torch.randn(24, module.feats.shape[1]), dim=-1))
    return task


def make_batch(task: Task, n: int = 16, seed: int = 0) -> Batch:
    """A batch as the loader builds it: transformed images, tokenized captions, every view the terms ask for
    (per-sample views drawn from each sample's own RNG, batch views from the captions and keys)."""
    size = task.model.preprocess_cfg()["image_size"]
    samples = [generate(seed * 1000 + i, image_size=size) for i in range(n)]
    transform = transform_from_model(task.model, train=False)
    captions, keys = CAPTIONS[:n], [f"{i:06d}" for i in range(n)]
    ids, mask = task.model.tokenizer(captions)
    images = torch.stack([transform(s.image) for s in samples])
    batch = Batch(images=images, text=ids, text_mask=mask, captions=captions, keys=keys)
    rngs = [random.Random(i) for i in range(n)]  # one per sample, drawn by each view in turn, as the loader does
    for name, view in task.views().items():
        if getattr(view, "reads_raw", False):  # other members of the raw sample (counterfactuals): none here
            parts = [view.from_raw({"__key__": k}, random.Random(i).getstate(), transform, 10**8)[0]
                     for i, k in enumerate(keys)]  # fmt: skip
            batch.views.update({f"{name}/{p}": torch.stack([x[p] for x in parts]) for p in parts[0]})
        elif view.kind == "sample":
            batch.views[name] = torch.stack([view(s.image, rng) for s, rng in zip(samples, rngs)])
        else:
            batch.views.update(view(captions, keys, True))
    return batch


class Recorder(torch.nn.Module):
    """Stands in for the prepared (DDP) task and records each forward: grad mode, cache pass, features."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task, self.calls = task, []

    def forward(self, batch: Batch, **kwargs):
        out = self.task(batch, **kwargs)
        self.calls.append(
            (torch.is_grad_enabled(), kwargs.get("batch_only", False), {k: v.detach().clone() for k, v in out.items()})
        )
        return out


def step(task: Task, batch: Batch, k: int, recorder: Recorder | None = None):
    task.zero_grad()
    out = task.step(batch.split(k), prepared=recorder).metrics
    return out, {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_accumulated_gradient_equals_the_full_batch(setup: str, tokenizer_path: Path) -> None:
    preset, terms, extra = SETUPS[setup]
    task = make_task(preset, terms, tokenizer_path, *extra)
    # dropout draws other masks for one full batch than for 4 micro-batches, so the comparison runs
    # without it (its replay between the two accumulation passes is tested below)
    task.train(mode="dropout" not in " ".join(extra))
    batch = make_batch(task)
    full_out, full = step(task, batch, 1)
    recorder = Recorder(task)
    acc_out, acc = step(task, batch, 4, recorder)
    assert full.keys() == acc.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=2e-5, rtol=1e-4, msg=name)
    # reported: the full batch's loss of every term (batch terms from the last pass, per-sample terms
    # weighed by their share of the tokens), and the weighted total
    for name in ["loss", *(f"{t}_loss" for t in task.terms)]:
        assert acc_out[name] == pytest.approx(full_out[name], rel=1e-5, abs=1e-6), name
    if task.has_batch_terms:  # GradCache: 4 cache passes without grad, then 4 recomputes with grad
        assert [(g, c) for g, c, _ in recorder.calls] == [(False, True)] * 4 + [(True, False)] * 4
    else:  # per-sample terms only: plain accumulation
        assert [(g, c) for g, c, _ in recorder.calls] == [(True, False)] * 4


def test_weights_apply_once_and_terms_are_logged_apart(tokenizer_path: Path) -> None:
    task = make_task(*SETUPS["clip+caption"][:2], tokenizer_path)
    out, _ = step(task, make_batch(task), 2)
    assert {"loss", "clip_loss", "caption_loss", "acc_i2t", "acc_t2i", "logit_scale", "token_acc", "ppl"} <= set(out)
    assert out["loss"] == pytest.approx(0.7 * out["clip_loss"] + 2.0 * out["caption_loss"], rel=1e-6)


def test_dropout_is_replayed_in_the_recompute_pass() -> None:
    task = make_task("clip-tiny", "[clip]", None, "model.image.timm_kwargs={proj_drop_rate: 0.3, attn_drop_rate: 0.3}")
    task.train()
    recorder = Recorder(task)
    step(task, make_batch(task), 2, recorder)
    cached, recomputed = [c[2] for c in recorder.calls[:2]], [c[2] for c in recorder.calls[2:]]
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(a["image_features"], b["image_features"])
    again = task(make_batch(task).split(2)[0])["image_features"]  # dropout really is active
    assert not torch.allclose(again, cached[0]["image_features"])


# ---------------------------------------------------------------- DDP: 2 processes x 2 micro-batches

WORLD = 2


def _ddp_worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        saved = torch.load(Path(root) / "reference.pt", weights_only=True)
        task = make_task("clip-tiny", "[clip]")
        task.load_state_dict(saved["state"])
        n = saved["images"].shape[0] // WORLD
        own = slice(rank * n, (rank + 1) * n)
        batch = Batch(images=saved["images"][own], text=saved["text"][own], text_mask=saved["mask"][own])
        check_ddp_step(task, batch, saved, rank, WORLD)
    finally:
        dist.destroy_process_group()


def test_ddp_with_accumulation_equals_the_full_batch(tmp_path: Path) -> None:
    task = make_task("clip-tiny", "[clip]")
    batch = make_batch(task)
    out, grads = step(task, batch, 1)
    torch.save(
        {"state": task.state_dict(), "images": batch.images, "text": batch.text, "mask": batch.text_mask,
         "loss": torch.tensor(out["loss"]), "grads": grads},
        tmp_path / "reference.pt",
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: children inherit the imports (spawn re-imports torch, timm, transformers: ~40 s here)
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
