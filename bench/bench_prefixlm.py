"""PrefixLM (SimVLM) on CPU: training throughput and caption generation latency, fp32.

    python -m bench.bench_prefixlm                      # ~5-6 min; writes bench/results/prefixlm.json + prefixlm.md
    python -m bench.bench_prefixlm --presets prefixlm-tiny-conv --repeats 1 --out /tmp/plm   # a quick check

For each preset (default `prefixlm-tiny-conv` and `prefixlm-small`), randomly initialised (seed 0),
generation first (on the untrained initialisation), then training:

  train     `mmcl.tasks.build_task(model, cfg)` with `cfg = load_experiment(None, ['model.preset=...'])`:
            forward (`task.loss(task(batch), batch)`) + backward + AdamW step (`mmcl.engine.optim.build_optimizer`,
            the trainer's optimizer), batch 32 of built-in synthetic samples (`mmcl.data.synthetic.generate`
            at the model's image size, eval transform), fp32. Data preparation (including the caption split
            and tokenization, which the loader workers do in training) is outside the timed span.
            After warm-up steps, each repeat times a few steps; target tokens/s counts the decoder targets
            (suffix + EOS, the loader's deterministic caption split), samples/s the images.
  generate  `model.caption(images, max_new_tokens=24, ...)` on 8 images: greedy with the KV cache,
            greedy without (`use_cache=False`), beam search 3 with the cache. A 2-token call per mode
            warms up first. Latency per batch and per image; the generated token ids are captured from
            the HF `generate()` call inside `caption()`, so the table gives decoder steps and tokens
            generated (up to and including EOS; a random-init model rarely stops early).

Every measurement is repeated `--repeats` times (default 3) and the median reported; the 1-minute load
average is recorded before and after each, since other jobs may share the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine_info, machine_markdown, markdown_table, median, reproduce_command, write_files

DEFAULT_PRESETS = ("prefixlm-tiny-conv", "prefixlm-small")
# Warm-up steps and steps per timed repeat (prefixlm-small: 4-20 s a step on 2 shared cores, load-dependent).
TRAIN_STEPS = {"prefixlm-tiny-conv": (3, 5), "prefixlm-small": (1, 2)}
GEN_MODES = {
    "greedy + KV cache": {"num_beams": 1, "use_cache": True},
    "greedy, no cache": {"num_beams": 1, "use_cache": False},
    "beam 3 + KV cache": {"num_beams": 3, "use_cache": True},
}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- data


def make_batches(model: Any, n_batches: int, batch_size: int, start: int = 0) -> list[Any]:
    """`n_batches` distinct batches of synthetic samples at the model's image size (eval transform)."""
    import torch

    from mmcl.data.batch import Batch
    from mmcl.data.synthetic import generate
    from mmcl.data.transforms import transform_from_model
    from mmcl.data.views import CaptionSplitView

    tf = transform_from_model(model, train=False)
    split = CaptionSplitView(model.tokenizer, model.dcfg, model.split_seed)
    size = model.preprocess_cfg()["image_size"]
    batches = []
    for b in range(n_batches):
        idx = range(start + b * batch_size, start + (b + 1) * batch_size)
        samples = [generate(i, image_size=size) for i in idx]
        captions, keys = [s.caption for s in samples], [f"{i:08d}" for i in idx]
        batches.append(
            Batch(
                images=torch.stack([tf(s.image) for s in samples]),
                captions=captions,
                keys=keys,
                views={f"caption/{k}": v for k, v in split(captions, keys, True).items()},  # the caption term's
            )
        )
    return batches


def target_tokens(model: Any, batch: Any) -> int:
    """Decoder target tokens of `batch` (suffix + EOS per caption), the ones the loss is computed on."""
    from mmcl.data.views import IGNORE_INDEX

    return int((batch.views["caption/lm_labels"] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------- training


def bench_train(task: Any, cfg: Any, batches: list[Any], warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """Steady-state fp32 training speed: `repeats` timed spans of `steps` optimizer steps after `warmup` steps."""
    from mmcl.engine.optim import build_optimizer

    model = task.model
    opt = build_optimizer(task, cfg.train)
    task.train()
    tokens = [target_tokens(model, b) for b in batches]
    i = 0

    def step() -> tuple[int, int, float]:
        nonlocal i
        batch, n_tok = batches[i % len(batches)], tokens[i % len(batches)]
        i += 1
        loss, _ = task.loss(task(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(batch), n_tok, float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    reps = []
    for _ in range(repeats):
        n_samples = n_tokens = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            s, t, loss = step()
            n_samples, n_tokens = n_samples + s, n_tokens + t
        dt = time.perf_counter() - t0
        reps.append(
            {
                "seconds": round(dt, 3),
                "steps": steps,
                "samples": n_samples,
                "target_tokens": n_tokens,
                "samples_per_s": round(n_samples / dt, 2),
                "tokens_per_s": round(n_tokens / dt, 1),
                "loss_last": round(loss, 3),
                "loadavg_1min_after": load1(),
            }
        )
        print(
            f"[prefixlm]   train: {reps[-1]['tokens_per_s']} tok/s, {reps[-1]['samples_per_s']} samples/s "
            f"({dt:.2f} s, load {reps[-1]['loadavg_1min_after']})",
            flush=True,
        )
    return {
        "batch_size": len(batches[0]),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 2),
        "steps_per_repeat": steps,
        "target_tokens_per_sample": round(sum(tokens) / sum(len(b) for b in batches), 2),
        "tokens_per_s": median([r["tokens_per_s"] for r in reps]),
        "samples_per_s": median([r["samples_per_s"] for r in reps]),
        "step_s": median([r["seconds"] / r["steps"] for r in reps]),
        "repeats": reps,
    }


# ----------------------------------------------------------------------------- generation


@contextlib.contextmanager
def capture_generate(model: Any) -> Iterator[list[Any]]:
    """Record the token ids (B, 1 + new) that `model.caption()` gets from the HF `generate()` it calls."""
    seq2seq = model.seq2seq
    original = seq2seq.generate
    outputs: list[Any] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        outputs.append(out)
        return out

    seq2seq.generate = wrapped  # instance attribute shadows the method for the duration
    try:
        yield outputs
    finally:
        del seq2seq.generate


def generated_tokens(ids: Any, eos_id: int) -> int:
    """New tokens per row up to and including the first EOS (all of them when there is none), summed."""
    total = 0
    for row in ids[:, 1:].tolist():
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def bench_generate(model: Any, images: Any, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """Latency of `caption()` on one batch of images for each mode of GEN_MODES."""
    model.eval()
    eos = model.tokenizer.eos_id
    out: dict[str, Any] = {}
    reference = None
    for mode, kw in GEN_MODES.items():
        model.caption(images, max_new_tokens=2, **kw)  # warm-up: allocator, generation config, code paths
        reps = []
        for _ in range(repeats):
            with capture_generate(model) as captured:
                t0 = time.perf_counter()
                captions = model.caption(images, max_new_tokens=max_new_tokens, **kw)
                dt = time.perf_counter() - t0
            ids = captured[-1]
            reps.append(
                {
                    "seconds": round(dt, 4),
                    "decoder_steps": int(ids.shape[1] - 1),
                    "tokens_generated": generated_tokens(ids, eos),
                    "loadavg_1min_after": load1(),
                }
            )
        if reference is None:
            reference = captions
        n = images.shape[0]
        batch_s = median([r["seconds"] for r in reps])
        steps = reps[0]["decoder_steps"]
        out[mode] = {
            **kw,
            "batch_size": n,
            "max_new_tokens": max_new_tokens,
            "batch_s": round(batch_s, 4),
            "per_image_s": round(batch_s / n, 4),
            "per_step_ms": round(1000 * batch_s / max(steps, 1), 2),
            "decoder_steps": steps,
            "tokens_generated": reps[0]["tokens_generated"],
            "tokens_per_s": round(reps[0]["tokens_generated"] / batch_s, 1),
            "same_captions_as_greedy_cached": captions == reference,
            "example_caption": captions[0],
            "repeats": reps,
        }
        print(
            f"[prefixlm]   {mode}: {batch_s:.3f} s / batch of {n}, {steps} steps, "
            f"{reps[0]['tokens_generated']} tokens (load {reps[-1]['loadavg_1min_after']})",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- driver


def bench_preset(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import mmcl.models
    import mmcl.tasks
    from mmcl.config import load_experiment, model_config

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = mmcl.models.build_model(model_config(preset))
    cfg = load_experiment(None, [f"model.preset={preset}"])
    task = mmcl.tasks.build_task(model, cfg)
    build_s = time.perf_counter() - t0
    warmup, steps = TRAIN_STEPS.get(preset, (1, 1))
    n_batches = min(warmup + steps * args.repeats, 4)  # a few distinct batches, cycled
    batches = make_batches(model, n_batches, args.batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.seq2seq.get_input_embeddings().weight.numel()
    print(f"[prefixlm] {preset}: {n_params / 1e6:.1f}M parameters, built in {build_s:.1f} s", flush=True)
    res: dict[str, Any] = {
        "preset": preset,
        "parameters": n_params,
        "embedding_parameters": emb,
        "vocab_size": model.tokenizer.vocab_size,
        "image_size": model.preprocess_cfg()["image_size"],
        "image_tokens": int(model.encode_images(batches[0].images[:1]).shape[1]),
        "max_text_len": model.dcfg.max_text_len,
        "loadavg_1min_before": load1(),
    }
    # Generation first, on the seed-0 initialisation: its outputs (and so tokens generated) then do not
    # depend on how many training steps ran before.
    gen_images = make_batches(model, 1, args.gen_batch_size, start=10_000)[0].images
    res["generate"] = bench_generate(model, gen_images, args.max_new_tokens, args.repeats)
    res["train"] = bench_train(task, cfg, batches, warmup, steps, args.repeats)
    res["loadavg_1min_after"] = load1()
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    info = machine_info()
    info["transformers"] = transformers.__version__
    start = time.perf_counter()
    presets = [bench_preset(p, args) for p in args.presets]
    return {
        "benchmark": "prefixlm",
        "device": "cpu",
        "precision": "fp32",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": info,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.perf_counter() - start, 1),
        "presets": presets,
        "not_measured": "bf16 GPU training throughput of prefixlm-base: no GPU device was lent to this session",
        "command": reproduce_command("bench_prefixlm.py"),
    }


def _during(res: dict[str, Any]) -> list[float]:
    loads = []
    for p in res["presets"]:
        loads += [r["loadavg_1min_after"] for r in p["train"]["repeats"]]
        for g in p["generate"].values():
            loads += [r["loadavg_1min_after"] for r in g["repeats"]]
    return loads


def to_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    train_rows = [
        [
            p["preset"],
            f"{p['parameters'] / 1e6:.1f}M ({p['embedding_parameters'] / 1e6:.1f}M embedding)",
            f"{p['image_size']} px / {p['image_tokens']} tokens",
            p["train"]["batch_size"],
            p["train"]["target_tokens_per_sample"],
            f"{p['train']['tokens_per_s']:.0f}",
            f"{p['train']['samples_per_s']:.1f}",
            f"{p['train']['step_s']:.2f}",
            f"{p['train']['warmup_steps']} + {len(p['train']['repeats'])} x {p['train']['steps_per_repeat']}",
        ]
        for p in res["presets"]
    ]
    gen_rows = [
        [
            p["preset"],
            mode,
            f"{g['batch_s']:.3f}",
            f"{1000 * g['per_image_s']:.0f}",
            f"{g['per_step_ms']:.1f}",
            g["decoder_steps"],
            g["tokens_generated"],
            f"{g['tokens_per_s']:.0f}",
            ("yes" if g["same_captions_as_greedy_cached"] else "NO") if mode == "greedy, no cache" else "-",
        ]
        for p in res["presets"]
        for mode, g in p["generate"].items()
    ]
    train_table = markdown_table(
        [
            "preset",
            "parameters",
            "image",
            "batch",
            "target tok / sample",
            "target tok/s",
            "samples/s",
            "s / step",
            "steps",
        ],
        train_rows,
    )
    gen_table = markdown_table(
        ["preset", "mode", "s / batch", "ms / image", "ms / step", "decoder steps", "tokens", "tok/s", "same"], gen_rows
    )
    info = res["machine"]
    load_start = info["loadavg_start"][0]
    return f"""# PrefixLM (SimVLM) on CPU, fp32

Randomly initialised models (seed 0; generation runs on the untrained initialisation, before the training
steps), torch {info["torch"]} with {s["threads"]} threads, transformers {info["transformers"]}. Median of {s["repeats"]} repeats; per-repeat numbers and load averages are in `prefixlm.json`.

## Training throughput

`task(batch)['loss']` + backward + AdamW step (`mmcl.engine.optim.build_optimizer`), batch {s["batch_size"]}
of built-in synthetic samples at the model's image size, fp32. Target tokens = decoder targets the loss
is computed on (caption suffix + EOS after the random prefix cut). Data preparation is not timed.
Steps = warm-up + repeats x timed steps per repeat.

{train_table}

## Caption generation latency

`model.caption(images, max_new_tokens={s["max_new_tokens"]}, num_beams=..., use_cache=...)` on a batch of
{s["gen_batch_size"]} images (image encoding included), after a 2-token warm-up call per mode. Decoder steps =
tokens generated per sequence (untrained models rarely emit EOS, so usually the full {s["max_new_tokens"]});
tokens = new tokens over the batch up to and including EOS; tok/s = tokens / batch latency. "same" = the
greedy captions without the cache equal those with it (the cache must not change greedy output).

{gen_table}

## Not measured

bf16 GPU training throughput for `prefixlm-base`: not measured (no GPU device was lent to this session).

## Machine and load

{machine_markdown(info, during=_during(res))}
1-minute load average at the start: {load_start:.2f} (before this run's own work; the CPU has 2 cores and this
run keeps about 2 busy, so values well above 2 during the run mean other jobs competed for them); 1/5/15-min
averages at the end: {res["loadavg_end"]}. Whole run {res["wall_s"]:.0f} s.

Reproduce:

```
{res["command"]}
```
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="training batch")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    res = run(args)
    js, md = write_files("prefixlm", res, to_markdown(res), out_dir=args.out, echo=False)
    print(f"[prefixlm] wrote {js} and {md}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
