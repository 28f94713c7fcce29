"""adapt against the DINOv2 reference: per-group gradient norms, separate clips, the trainable
prototype gain, uniform drop path, the colour augmentations and the context window."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from factories import TINY, timm_model

from geoexplora import sample
from geoexplora.pipelines import adapt as A
from geoexplora.ssl import dinov2 as D


@pytest.fixture(scope="module")
def tiny_objective():
    from geoexplora.models import apply_explora, build_backbone

    torch.manual_seed(0)
    vit = build_backbone(init=TINY, init_weights="random", img_size=28)
    apply_explora(vit, lora_rank=4)
    return D.DinoV2Objective(vit, D.DinoHeadSize(32, 16, 64), D.CropSizes(28, 14),
                             total_steps=100)


def test_grad_norm_groups_split_the_trainable_parameters(tiny_objective):
    groups = tiny_objective.grad_norm_groups()
    assert list(groups) == ["lora", "blocks", "norms_embedding", "head"]
    # 3 frozen blocks x (A, B) x (q, v); the last block's 14 tensors; cls token, 3 x 2 norms of
    # 2 tensors and the final norm; the head's 3 linear layers (weight, bias) + prototypes
    sizes = {k: len(v) for k, v in groups.items()}
    assert sizes["lora"] == 12 and sizes["blocks"] == 14 and sizes["norms_embedding"] == 15
    trainable = {id(p) for p in tiny_objective.student.parameters() if p.requires_grad}
    assert {id(p) for v in groups.values() for p in v} == trainable
    assert sum(sizes.values()) == len(trainable)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), path)
    return path


def test_the_log_has_a_gradient_norm_per_group_and_the_lr(tmp_path, tiny_weights):
    out = tmp_path / "groups.pt"
    A.adapt(A.AdaptConfig(inputs=sample.slovenia_scenes()[:1], output=out,
                          bands=["B2", "B3", "B4", "B8"], init=TINY,
                          init_weights=str(tiny_weights), steps=3, batch_size=2, crop_size=56,
                          local_crop_size=28, local_crops=1, num_workers=0, lr=1e-3,
                          warmup_steps=0, progress=False))
    records = [json.loads(line) for line in (tmp_path / "groups.log.jsonl").read_text()
               .splitlines()]
    assert len(records) == 3
    for r in records:
        parts = [r[f"grad_norm_{g}"] for g in ("lora", "blocks", "norms_embedding", "head")]
        assert all(v > 0 for v in parts)
        # the total (before clipping) is the norm of the groups' norms
        assert r["grad_norm"] == pytest.approx(sum(v * v for v in parts) ** 0.5, rel=1e-4)
    assert records[0]["lr"] == pytest.approx(1e-3)
    assert "prototype_max_mass" in records[0] and "uniform_entropy" in records[0]


def test_drop_path_is_uniform_in_every_block(tmp_path, tiny_weights):
    from timm.layers import DropPath

    from geoexplora.defaults import DINOV2

    cfg = A.resolve_scale(A.AdaptConfig(inputs=sample.slovenia_scenes()[:1], output=tmp_path
                                        / "x.pt", init=TINY, init_weights=str(tiny_weights),
                                        crop_size=56), world=1)
    stats = {"mean": [0.1] * 4, "std": [0.05] * 4}
    from geoexplora import bands as B

    bands = [B.find_band("sentinel2", b) for b in ("B2", "B3", "B4", "B8")]
    backbone, _ = A.build_model(cfg, "dinov2", DINOV2, bands, stats, 1)
    rates = [getattr(block, attr).drop_prob for block in backbone.modules()
             for attr in ("drop_path1", "drop_path2") if hasattr(block, attr)]
    assert rates == [0.3] * 8  # 4 blocks x 2 branches, the first block too (timm: 0 there)
    ramp, _ = A.build_model(cfg, "dinov2", dataclasses.replace(DINOV2, drop_path_uniform=False),
                            bands, stats, 1)
    first = next(m for m in ramp.modules() if hasattr(m, "drop_path1"))
    assert not isinstance(first.drop_path1, DropPath)  # timm's ramp starts at 0


def test_the_prototypes_gain_trains_on_its_own_lr_schedule(tiny_objective):
    from geoexplora.defaults import DINOV2
    from geoexplora.train import engine as E

    head = tiny_objective.student["head"]
    assert head.gain.requires_grad and torch.all(head.gain == 1.0)
    groups = A.optimizer_groups(tiny_objective, "dinov2", DINOV2, depth=4)
    last = [g for g in groups if "frozen_until" in g]
    assert {id(p) for g in last for p in g["params"]} == {id(head.gain), id(head.direction)}
    assert all(g["frozen_until"] == tiny_objective.freeze_last_layer_steps == 2 for g in last)
    optimizer = E.build_optimizer(groups)
    schedules = D.LastLayerSchedules(total_steps=100, lr=1e-3, warmup_steps=10)
    for step, expected in ((0, 0.0), (1, 0.0), (2, 2e-4), (10, 1e-3)):
        schedules.apply(optimizer, step)
        lrs = [g["lr"] for g in optimizer.param_groups if "frozen_until" in g]
        others = [g["lr"] / g["lr_scale"] for g in optimizer.param_groups
                  if "frozen_until" not in g]
        assert others == pytest.approx([schedules.lr_at(step)] * len(others))
        assert lrs == pytest.approx([expected * g["lr_scale"] for g in optimizer.param_groups
                                     if "frozen_until" in g])
    # the gain gets a gradient and moves once its lr is on
    views = D.DinoV2Views(14, D.CropSizes(28, 14))
    import numpy as np

    images = torch.rand(4, 1, 3, 40, 40) * 3000
    batch = torch.utils.data.default_collate([views(np.random.default_rng(i), images[i].numpy())
                                              for i in range(4)])
    batch["image"] = images
    tiny_objective(batch, 10)["loss"].backward()
    assert head.gain.grad is not None and head.gain.grad.abs().sum() > 0
    before = head.gain.detach().clone()
    optimizer.step()
    assert (head.gain.detach() - before).abs().max() > 1e-5
    optimizer.zero_grad(set_to_none=True)


class _TwoPart(torch.nn.Module):
    def __init__(self, separate=True):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.separate = separate

    def clip_groups(self):
        return ({"backbone": [self.backbone.weight], "head": [self.head.weight]}
                if self.separate else None)


@pytest.mark.parametrize("separate", [True, False])
def test_backbone_and_head_are_clipped_separately(separate):
    from geoexplora.train import engine as E

    fabric = E.make_fabric(E.FabricSettings(accelerator="cpu"), launch=False)
    objective = _TwoPart(separate)
    optimizer = E.build_optimizer(E.param_groups(objective))
    loop = E.TrainLoop(fabric, objective, optimizer, [], E.LoopSettings(
        output="unused.pt", steps=1, batch_size=1, clip_grad=3.0), E.Schedules(1, 0.0))
    objective.backbone.weight.grad = torch.full((4, 4), 10.0 / 4)  # norm 10
    objective.head.weight.grad = torch.full((4, 4), 1.0 / 4)  # norm 1
    terms = loop._clip_and_measure()
    assert terms["grad_norm"].item() == pytest.approx((100 + 1) ** 0.5)
    backbone, head = (objective.backbone.weight.grad.norm().item(),
                      objective.head.weight.grad.norm().item())
    if separate:  # DINOv2: each at 3.0, the head's small gradient untouched
        assert (backbone, head) == (pytest.approx(3.0, rel=1e-5), pytest.approx(1.0))
    else:  # one clip scales both by 3 / sqrt(101)
        scale = 3.0 / 101 ** 0.5
        assert (backbone, head) == (pytest.approx(10 * scale, rel=1e-5),
                                    pytest.approx(scale, rel=1e-5))
