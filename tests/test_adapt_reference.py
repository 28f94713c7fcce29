"""adapt against the DINOv2 reference: per-group gradient norms, separate clips, the trainable
prototype gain, uniform drop path, the colour augmentations and the context window."""

from __future__ import annotations

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
