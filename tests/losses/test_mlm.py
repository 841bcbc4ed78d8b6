"""The masked-token (MLM) term: BERT's masking rule in the loader view, the loss against a plain per-caption
loop, the towers' per-token states against their pooled forward, the head's state in checkpoints, and the
towers it refuses. Its learning test is in test_objective_learning.py; accumulation in tests/engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.masking import MaskedTokensView, mask_token_id
from mmcl.data.synthetic import generate
from mmcl.data.views import IGNORE_INDEX
from mmcl.models import build_model
from mmcl.tasks import Task, build_task
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [generate(i, image_size=32).caption for i in range(24)] + ["a", ""]


def _task(terms: str = "[clip, {name: mlm, weight: 0.5}]", preset: str = "clip-tiny", seed: int = 0) -> Task:
    torch.manual_seed(seed)
    cfg = load_experiment(None, [f"model.preset={preset}", f"loss.terms={terms}"])
    return build_task(build_model(cfg.model), cfg)


def _batch(task: Task, captions: list[str], keys: list[str] | None = None) -> Batch:
    keys = keys or [f"{i:06d}" for i in range(len(captions))]
    batch = Batch(captions=captions, keys=keys)
    batch.text, batch.text_mask = task.model.tokenizer(captions)
    batch.views.update(task.terms["mlm"].views(task.model)["tokens"](captions, keys))
    return batch


def test_masking_follows_berts_rule() -> None:
    task = _task()
    tok = task.model.tokenizer
    mask_id = mask_token_id(tok)
    assert mask_id == tok.bos_id  # CLIP's BPE has no [MASK]: the start marker, never seen past position 0
    captions = [generate(i, image_size=32).caption for i in range(600)]
    view = MaskedTokensView(tok, mask_id, mask_prob=0.3)
    out = view(captions, [str(i) for i in range(600)])
    ids, mask = tok(captions)
    labels, masked = out["labels"], out["ids"]
    assert torch.equal(out["mask"], mask)
    chosen = labels != IGNORE_INDEX
    torch.testing.assert_close(labels[chosen], ids[chosen])  # the labels are the original ids
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else changes
    lengths = mask.sum(1)
    assert not chosen[:, 0].any() and not chosen[torch.arange(600), lengths - 1].any()  # never the BOS / EOS
    assert not (chosen & (mask == 0)).any()  # never padding
    real = lengths - 2
    assert torch.equal(chosen.sum(1), torch.clamp((0.3 * real.double()).round().long(), min=1))
    kind_mask = (masked[chosen] == mask_id).double().mean()
    kind_keep = (masked[chosen] == ids[chosen]).double().mean()
    assert kind_mask == pytest.approx(0.8, abs=0.03), kind_mask
    assert kind_keep == pytest.approx(0.1, abs=0.02), kind_keep  # (plus the odd random draw of the same id)
    assert not set(masked[chosen & (masked != ids)].tolist()) & {tok.eos_id, tok.pad_id} - {mask_id}


def test_masks_depend_on_the_sample_key_only() -> None:
    task = _task()
    view = task.terms["mlm"].views(task.model)["tokens"]
    full = view(CAPTIONS[:8], [f"k{i}" for i in range(8)])
    part = view(CAPTIONS[4:8][::-1], [f"k{i}" for i in range(4, 8)][::-1])  # another batch, other order
    for name in ("ids", "labels"):
        assert torch.equal(full[name][4:8], part[name].flip(0))
    other = MaskedTokensView(task.model.tokenizer, view.mask_id, seed=1)(CAPTIONS[:8], [f"k{i}" for i in range(8)])
    assert not torch.equal(other["labels"], full["labels"])


def test_token_states_agree_with_the_pooled_tower() -> None:
    task = _task()
    tower = task.model.text.eval()
    ids, mask = task.model.tokenizer(CAPTIONS[:6])
    states = tower.token_states(ids, mask)  # (B, n, W)
    eos = mask.sum(1) - 1
    pooled = states[torch.arange(6), eos] @ tower.text_projection
    torch.testing.assert_close(pooled, tower(ids, mask), atol=1e-5, rtol=1e-5)


def test_mlm_matches_a_loop() -> None:
    task = _task("[mlm]").double()
    term, model = task.terms["mlm"], task.model
    with torch.no_grad():  # a trained-looking head: non-trivial bias and norm
        term.head.bias.normal_()
        term.head.norm.weight.normal_()
    batch = _batch(task, CAPTIONS)
    out = term(term.features(model, batch, {}), batch)
    tower, head = model.text, term.head
    total, count, correct = 0.0, 0, 0
    for ids, mask, labels in zip(batch.views["ids"], batch.views["mask"], batch.views["labels"]):
        n = int(mask.sum())
        x = tower.token_embedding.weight[ids[:n]] + tower.positional_embedding[:n]  # (n, W), this caption alone
        for block in tower.transformer.resblocks:
            x = block(x[None])[0]
        x = tower.ln_final(x)
        for pos in range(n):
            if labels[pos] == IGNORE_INDEX:
                continue
            h = F.layer_norm(F.gelu(x[pos] @ head.dense.weight.T + head.dense.bias), (x.shape[1],),
                             head.norm.weight, head.norm.bias)  # fmt: skip
            logits = head.log_scale.exp() * tower.token_embedding.weight @ h + head.bias  # (V,)
            total -= torch.log_softmax(logits, 0)[labels[pos]]
            correct += int(logits.argmax() == labels[pos])
            count += 1
    assert count == term.count(batch) > len(CAPTIONS) - 2
    assert out["loss"].item() == pytest.approx(float(total.detach()) / count, rel=1e-9)
    assert out["acc"].item() == pytest.approx(correct / count)


def test_the_head_is_tied_and_checkpointed() -> None:
    task = _task()
    state = task.state_for_checkpoint()
    # the decoder is the tower's token embedding: no second 49408-row matrix in the term's state
    head = {k.removeprefix("terms.mlm.head.") for k in state if k.startswith("terms.mlm.")}
    assert head == {"bias", "dense.bias", "dense.weight", "log_scale", "norm.bias", "norm.weight"}
    batch = _batch(task, CAPTIONS[:8])
    loss = task.terms["mlm"].features(task.model, batch, {})["logits"].logsumexp(-1).sum()
    loss.backward()
    assert task.model.text.token_embedding.weight.grad.abs().sum() > 0  # the tied decoder trains the embedding
    with torch.no_grad():
        for p in task.terms["mlm"].parameters():
            p.add_(0.1)
    restored = _task(seed=1)
    restored.model.load_state_dict(task.model.state_dict())
    restored.load_state_dict(state | {f"model.{k}": v for k, v in task.model.state_dict().items()})
    term, other = task.terms["mlm"].eval(), restored.terms["mlm"].eval()
    with torch.no_grad():
        a = term(term.features(task.model, batch, {}), batch)["loss"]
        b = other(other.features(restored.model, batch, {}), batch)["loss"]
    assert a.item() == b.item()


def test_untied_head_owns_its_decoder() -> None:
    task = _task("[clip, {name: mlm, tie: false}]")
    assert task.terms["mlm"].head.decoder.shape == task.model.text.token_embedding.weight.shape
    batch = _batch(task, CAPTIONS[:4])
    assert torch.isfinite(task.terms["mlm"](task.terms["mlm"].features(task.model, batch, {}), batch)["loss"])


def test_hf_tower_uses_its_own_mask_token() -> None:
    task = _task(preset="lit-minilm-tiny")
    tok = task.model.tokenizer
    assert task.terms["mlm"].mask_id == tok.hf.mask_token_id  # BERT's [MASK]
    batch = _batch(task, CAPTIONS[:4])
    assert (batch.views["ids"] == tok.hf.mask_token_id).any()
    out = task.terms["mlm"](task.terms["mlm"].features(task.model, batch, {}), batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0


def test_models_without_per_token_text_states_are_refused() -> None:
    with pytest.raises(UserError, match="mlm loss term needs a dual encoder's text tower; PrefixLM"):
        _task("[mlm]", preset="prefixlm-tiny")
    with pytest.raises(UserError, match="mask_prob"):
        _task("[clip, {name: mlm, mask_prob: 0}]")
