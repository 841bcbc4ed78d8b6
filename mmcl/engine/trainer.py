"""The one training loop: Accelerate, any Task, step checkpoints and exact resume.

The loop knows nothing about CLIP or PrefixLM nor about shards: it asks the data
(`mmcl.data.pipeline.TrainBatches`) for k micro-batches, hands them to the task
(`Task.step`: forward and backward), clips, steps, calls the task's `on_step_end`
with the step's features, logs, evaluates and checkpoints. What it adds to a
plain Accelerate loop:

* exact resume: model, the task's own state (heads, queues, momentum encoders),
  optimizer, schedule, RNG and every loader worker's data position are restored,
  so a killed run continues the same loss curve;
* non-finite steps are skipped and counted; N in a row stop the run;
* the data loader is never passed to `accelerator.prepare` (the shard stream
  splits the shards by rank and worker itself), and the schedule is stepped by
  hand once per optimizer step.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmcl.config import ExperimentConfig, TrainConfig, load_yaml, save_yaml, to_dict
from mmcl.data.builtin import is_builtin
from mmcl.data.pipeline import TrainBatches, train_batches
from mmcl.data.shards import StreamState, count_samples, expand_shards
from mmcl.engine import checkpoint as ckpt
from mmcl.engine import fsdp
from mmcl.engine.interrupt import StopBetweenSteps, TrainingInterrupted, checkpoint_step_of
from mmcl.engine.metrics import MetricsLog, plot_curves
from mmcl.engine.optim import build_optimizer, lr_at, set_lr
from mmcl.engine.run_log import build_trackers, flat_config, log_line, logs_beside_bars, store_config, training_bar
from mmcl.losses.base import StepContext
from mmcl.run_folder import metrics_file
from mmcl.utils import UserError, disk_errors, lock_folder

log = logging.getLogger("mmcl.train")

LOCK_FILE = "train.lock"  # in the run folder: flock-ed by the training that writes there

EvalHook = Callable[[torch.nn.Module, int], dict[str, float]]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_dir: Path
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def resolve_precision(requested: str) -> str:
    """'auto' -> bf16 on GPUs that have it, else fp32.

    On CPUs, bf16 autocast ran 13-19x slower than fp32 without bf16 units (AVX2-only EPYC) and about as
    fast as fp32 for the tiny presets with AMX (Xeon): never a gain worth its rounding at these sizes.
    """
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise UserError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    log.info("precision: fp32 (auto: no GPU with bf16; on CPUs bf16 autocast is no faster, and far slower without AMX)")
    return "fp32"


class Trainer:
    """Trains `cfg` in `cfg.train.output_dir`. `fit()` resumes from the newest checkpoint there."""

    def __init__(self, cfg: ExperimentConfig, eval_hook: EvalHook | None = None) -> None:
        self.cfg = cfg
        self.tc: TrainConfig = cfg.train
        if not cfg.data.train_shards:
            raise UserError("data.train_shards is empty: point it at your shards (e.g. data.train_shards=[data/train])")
        for pattern in cfg.data.train_shards:  # fail on a bad pattern before building anything
            if not is_builtin(pattern):
                expand_shards(pattern)
        self.run_dir = Path(self.tc.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # One training per run folder (two would interleave metrics.jsonl and checkpoints). Taken before anything
        # is written there (W&B starts with the Accelerator); by the first rank only (RANK: torchrun, accelerate).
        self._lock = None
        if os.environ.get("RANK", "0") == "0":
            with disk_errors(self.run_dir):  # an unwritable output folder: one line
                self._lock = lock_folder(self.run_dir, LOCK_FILE, "training")
        try:
            self._build(eval_hook)
        except BaseException:  # no Trainer to hold it: free the folder now, not when the traceback is collected
            if self._lock is not None:
                self._lock.release()
            raise

    def _build(self, eval_hook: EvalHook | None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from mmcl.models import build_model
        from mmcl.tasks import build_task

        cfg = self.cfg
        trackers = [t for t in self.tc.trackers if t != "none"]
        self.accelerator = Accelerator(
            mixed_precision=resolve_precision(self.tc.precision).replace("fp32", "no"),
            log_with=build_trackers(trackers, self.run_dir) or None,
            project_dir=str(self.run_dir),
            cpu=not torch.cuda.is_available(),
        )
        set_seed(self.tc.seed + self.accelerator.process_index)
        self._prepare_builtin_data()
        self.model = build_model(cfg.model)
        if self.tc.grad_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.task = build_task(self.model, cfg)
        self.fsdp = self.accelerator.distributed_type == "FSDP"  # sharded state: mmcl/engine/fsdp.py
        if self.fsdp:
            fsdp.prepare(self.task)
        self.optimizer = build_optimizer(self.task, self.tc)
        if self.tc.compile:
            self.model.compile()
        self.prepared, self.optimizer = self.accelerator.prepare(self.task, self.optimizer)
        if self.fsdp:
            fsdp.after_wrap(self.task)
        self.eval_hook = eval_hook
        acc = self.accelerator
        self.batches = train_batches(cfg.data, self.model, acc, seed=self.tc.seed, views=self.task.views())
        self.samples_per_step = cfg.data.batch_size * self.tc.grad_accum * acc.num_processes

    def _prepare_builtin_data(self) -> None:
        """Write `builtin:` datasets named by the config once (main process), before any rank reads them."""
        from mmcl.data.builtin import ensure_builtin

        names = [p for p in [*self.cfg.data.train_shards, *self.cfg.eval.shards] if is_builtin(p)]
        if names and self.accelerator.is_main_process:
            for name in names:
                ensure_builtin(name, progress=self.tc.progress)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ checkpoints

    def _save(self, step: int, batches: TrainBatches, counters: dict[str, Any]) -> None:
        acc = self.accelerator
        tmp = ckpt.tmp_dir_for(self.ckpt_root, step)
        if acc.is_main_process:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.write_rank_state(tmp, acc.process_index, batches.state.to_dict())
        acc.wait_for_everyone()
        state = {"step": step, "num_processes": acc.num_processes, **counters}
        if self.fsdp:  # every rank takes part in gathering the full state; rank 0 writes it
            fsdp.save(tmp, self.task, self.optimizer, state, acc.is_main_process)
        elif acc.is_main_process:
            ckpt.write_main_state(tmp, self.task.model, self.optimizer, state, self.task.state_for_checkpoint())
        if acc.is_main_process:
            ckpt.publish(tmp, ckpt.step_dir(self.ckpt_root, step), self.tc.keep_checkpoints)
        acc.wait_for_everyone()

    def _restore(self) -> tuple[int, StreamState, dict[str, Any]]:
        # a damaged newest one: warn, use the previous; one past train.steps: a one-line error
        latest = ckpt.newest_valid_checkpoint(self.ckpt_root, max_step=self.tc.steps)
        if latest is None:
            return 0, StreamState(), {}
        saved_cfg = self.run_dir / "config.yaml"
        if saved_cfg.is_file() and load_yaml(saved_cfg).get("model") != to_dict(self.cfg.model):
            raise UserError(
                f"{self.run_dir} holds a run of a different model config: choose another "
                "train.output_dir or delete that folder"
            )
        import json

        trainer_state = json.loads((latest / "trainer.json").read_text())
        if trainer_state["num_processes"] != self.accelerator.num_processes:
            raise UserError(
                f"{latest} was written by {trainer_state['num_processes']} process(es); resume it "
                f"with the same number (got {self.accelerator.num_processes})"
            )
        if self.fsdp:
            fsdp.load(self.task, self.optimizer, latest)
        else:
            ckpt.load_model_weights(self.task.model, latest / "model.safetensors")
            ckpt.load_task_state(self.task, latest)
            ckpt.load_optimizer(self.optimizer, latest)
        rank_state = ckpt.read_rank_state(latest, self.accelerator.process_index)
        ckpt.set_rng_state(rank_state["rng"], rank_state["rng_tensors"])
        log.info("resumed from %s (step %d)", latest, trainer_state["step"])
        return trainer_state["step"], StreamState.from_dict(rank_state["data"]), trainer_state

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to `train.steps` (or stop early after `stop_after` steps, for tests and benchmarks).

        Raises:
            TrainingInterrupted: on Ctrl-C (a KeyboardInterrupt), saying at which step and how to resume.
        """
        self._step, self._bar = 0, None
        if self._lock is None and os.environ.get("RANK", "0") == "0":  # fit() again after a finished fit()
            self._lock = lock_folder(self.run_dir, LOCK_FILE, "training")
        self._stop = StopBetweenSteps(enabled=self.accelerator.num_processes == 1)
        try:
            # a full disk or a read-only run folder: one line saying so (what a checkpoint needs), no traceback
            with self._stop, disk_errors(self.run_dir, needed=self._checkpoint_bytes), logs_beside_bars():
                return self._fit(stop_after)
        except KeyboardInterrupt as e:
            if self._bar is not None:
                self._bar.close()  # the message goes on a line of its own
            if isinstance(e, TrainingInterrupted):
                raise
            newest = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingInterrupted(self._step, self.tc.steps, checkpoint_step_of(newest)) from None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes: the weights, and AdamW's two moments of each trainable one."""
        weights = sum(p.numel() * p.element_size() for p in self.task.parameters())
        trainable = sum(p.numel() * p.element_size() for p in self.task.parameters() if p.requires_grad)
        return weights + 2 * trainable

    def _fit(self, stop_after: int | None) -> TrainResult:
        acc, tc = self.accelerator, self.tc
        step, data_state, counters = self._restore()
        self._step = step
        if acc.is_main_process:
            save_yaml(self.cfg, self.run_dir / "config.yaml")
            self._announce(step)
        if acc.is_main_process:
            acc.init_trackers("tensorboard")  # logs in run_dir/tensorboard
            store_config(acc, flat_config(self.cfg))
        batches = self.batches
        batches.resume(data_state)
        metrics_log = MetricsLog(metrics_file(self.run_dir), resume_step=step) if acc.is_main_process else None
        bad_in_a_row = counters.get("bad_in_a_row", 0)
        bad_total = counters.get("bad_total", 0)
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        bar = self._bar = training_bar(acc.is_main_process and tc.progress and sys.stderr.isatty(), tc.steps, step)
        fit_start, first_step = time.perf_counter(), step
        end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
        while step < end:
            if self._stop.requested:  # Ctrl-C during the last step: stop between steps
                raise KeyboardInterrupt
            self.prepared.train()
            set_lr(self.optimizer, lr_at(step, tc))
            out = self.task.step([batches.next() for _ in range(tc.grad_accum)], acc, self.prepared)
            grad_norm = self._grad_norm()
            if not math.isfinite(grad_norm) or not math.isfinite(out.metrics.get("loss", 0.0)):
                self.optimizer.zero_grad(set_to_none=True)
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, bad_in_a_row)
                if bad_in_a_row >= tc.max_bad_steps:
                    raise RuntimeError(
                        f"stopping: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                        "(lower train.lr, check the data, or use fp32)"
                    )
                step += 1
                self._step = step
                continue
            bad_in_a_row = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            self._step = step
            self.task.on_step_end(self._step_context(step, out.features))
            for k, v in {**out.metrics, "grad_norm": grad_norm}.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % tc.log_every == 0 or step == end:
                elapsed = time.perf_counter() - window_start
                last = {k: v / window_steps for k, v in window.items()}
                last.update(
                    lr=lr_at(step - 1, tc),
                    samples_per_s=window_steps * self.samples_per_step / elapsed,
                    epoch=batches.state.epoch,
                    bad_steps=bad_total,
                )
                last.update({f"skipped_{k}": v for k, v in batches.skip_totals().items()})
                if metrics_log is not None:
                    metrics_log.append({"step": step, "samples": step * self.samples_per_step, **last})
                acc.log({f"train/{k}": v for k, v in last.items()}, step=step)  # grouped as open_clip does
                if bar is not None:
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", sps=f"{last['samples_per_s']:.0f}")
                elif acc.is_main_process and tc.progress:
                    log.info(log_line(step, tc.steps, last, time.perf_counter() - fit_start, step - first_step))
                window, window_steps, window_start = {}, 0, time.perf_counter()
            elif step == first_step + 1 and bar is None and acc.is_main_process and tc.progress:
                # a line at once: a log file would otherwise stay silent for log_every steps (minutes on a CPU)
                elapsed = time.perf_counter() - window_start
                first = {k: v / window_steps for k, v in window.items()}
                first.update(lr=lr_at(step - 1, tc), samples_per_s=window_steps * self.samples_per_step / elapsed)
                log.info(log_line(step, tc.steps, first, time.perf_counter() - fit_start, step - first_step))
            if self.eval_hook and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                eval_metrics = self._evaluate(step, metrics_log)
            if step % tc.ckpt_every == 0 or step == end:
                self._save(step, batches, {"bad_in_a_row": bad_in_a_row, "bad_total": bad_total})
        if bar is not None:
            bar.close()
        if step >= tc.steps and self.eval_hook:
            eval_metrics = self._evaluate(step, metrics_log)
        final_dir = self._finish(step, metrics_log)
        return TrainResult(self.run_dir, step, final_dir, last, eval_metrics)

    def _step_context(self, step: int, features: dict[str, torch.Tensor]) -> StepContext:
        acc = self.accelerator
        gather = acc.gather if acc.num_processes > 1 else (lambda t: t)
        return StepContext(
            step=step,
            rank=acc.process_index,
            world_size=acc.num_processes,
            gather=gather,
            features=features,
        )

    def _grad_norm(self) -> float:
        params = [p for p in self.task.parameters() if p.grad is not None]
        max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        if not params:
            return 0.0
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def _evaluate(self, step: int, metrics_log: MetricsLog | None) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.accelerator.is_main_process:
            model = self.task.model
            was_training = model.training
            model.eval()
            raw = self.eval_hook(model, step)
            results = {f"eval_{k}": v for k, v in raw.items()}
            model.train(was_training)
            if metrics_log is not None:
                metrics_log.append({"step": step, **results})
            self.accelerator.log({f"eval/{k}": v for k, v in raw.items()}, step=step)
            log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        self.accelerator.wait_for_everyone()
        return results

    def _finish(self, step: int, metrics_log: MetricsLog | None) -> Path:
        final_dir = self.run_dir / "final"
        if self.accelerator.is_main_process:
            final_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_model(self.task.model, final_dir / "model.safetensors")
            save_yaml(self.cfg, final_dir / "config.yaml")
            if metrics_log is not None and metrics_log.rows:
                plot_curves(metrics_log.rows, self.run_dir / "curves.png", title=self.run_dir.name)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # also ends the process group: no collective after this
        return final_dir

    def _announce(self, step: int) -> None:
        n = count_samples(self.batches.stream.all_shards)
        params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(
            "model %s: %.2fM parameters (%.2fM trainable); %d process(es) on %s; %s",
            self.cfg.model.arch,
            params / 1e6,
            trainable / 1e6,
            self.accelerator.num_processes,
            self.accelerator.device,
            f"{n} training samples" if n is not None else "sample count unknown",
        )
        if n:
            log.info(
                "%d steps x %d samples = %.1f epochs",
                self.tc.steps,
                self.samples_per_step,
                self.tc.steps * self.samples_per_step / n,
            )
        if step:
            log.info("continuing at step %d of %d", step, self.tc.steps)


def train(cfg: ExperimentConfig, eval_hook: EvalHook | None = None, stop_after: int | None = None) -> TrainResult:
    """Train `cfg` (resuming from its output_dir if it holds checkpoints)."""
    return Trainer(cfg, eval_hook=eval_hook).fit(stop_after=stop_after)
