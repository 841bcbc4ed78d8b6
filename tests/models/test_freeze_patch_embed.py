"""model.image.freeze_patch_embed: MoCo v3's frozen random patch projection (Chen, Xie & He 2021)."""

from __future__ import annotations

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.engine.optim import build_optimizer
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patch_projection_stays_fixed_while_the_rest_trains() -> None:
    torch.manual_seed(0)
    cfg = load_experiment("configs/objectives/mocov3.yaml", ["data.batch_size=4"])  # as shipped: frozen
    task = build_task(build_model(cfg.model), cfg)
    trunk = task.model.image.trunk
    frozen = {n: p.detach().clone() for n, p in trunk.patch_embed.named_parameters()}
    assert frozen and not any(p.requires_grad for p in trunk.patch_embed.parameters())
    others = {n: p.detach().clone() for n, p in trunk.blocks.named_parameters()}
    opt = build_optimizer(task, cfg.train)
    size = cfg.model.image.image_size
    g = torch.Generator().manual_seed(1)
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    for _ in range(3):
        views = {f"mocov3/view{i}": torch.randn(4, 3, size, size, generator=g) for i in (1, 2)}
        text, mask = task.model.tokenizer(captions)
        batch = Batch(images=torch.randn(4, 3, size, size, generator=g), text=text, text_mask=mask, views=views)
        loss, _ = task.loss(task(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in trunk.patch_embed.named_parameters():
        torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
    assert any(not torch.equal(p, others[n]) for n, p in trunk.blocks.named_parameters())
    key_tower = task.terms["mocov3"].key_tower  # the momentum copy holds the same fixed projection
    torch.testing.assert_close(key_tower.trunk.patch_embed.proj.weight, frozen["proj.weight"], rtol=0, atol=0)


def test_a_tower_without_patch_embed_is_a_one_line_error() -> None:
    cfg = load_experiment(None, ["model.preset=clip-tiny-cnn-64", "model.image.freeze_patch_embed=true"])
    with pytest.raises(UserError, match="freeze_patch_embed needs a ViT"):
        build_model(cfg.model)
