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
from geoexplora.ssl import augment as AUG
from geoexplora.ssl import dinov2 as D


@pytest.fixture(scope="module")
def tiny_objective():
    from geoexplora.models import apply_explora, build_backbone

    torch.manual_seed(0)
    vit = build_backbone(init=TINY, init_weights="random", img_size=28)
    apply_explora(vit, lora_rank=4)
    return D.DinoV2Objective(vit, D.DinoHeadSize(32, 16, 64), D.CropSizes(28, 14), total_steps=100)


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
    A.adapt(
        A.AdaptConfig(
            inputs=sample.slovenia_scenes()[:1],
            output=out,
            bands=["B2", "B3", "B4", "B8"],
            init=TINY,
            init_weights=str(tiny_weights),
            steps=3,
            batch_size=2,
            crop_size=56,
            local_crop_size=28,
            local_crops=1,
            num_workers=0,
            lr=1e-3,
            warmup_steps=0,
            progress=False,
        )
    )
    records = [
        json.loads(line) for line in (tmp_path / "groups.log.jsonl").read_text().splitlines()
    ]
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

    cfg = A.resolve_scale(
        A.AdaptConfig(
            inputs=sample.slovenia_scenes()[:1],
            output=tmp_path / "x.pt",
            init=TINY,
            init_weights=str(tiny_weights),
            crop_size=56,
        ),
        world=1,
    )
    stats = {"mean": [0.1] * 4, "std": [0.05] * 4}
    from geoexplora import bands as B

    bands = [B.find_band("sentinel2", b) for b in ("B2", "B3", "B4", "B8")]
    backbone, _ = A.build_model(cfg, "dinov2", DINOV2, bands, stats, 1)
    rates = [
        getattr(block, attr).drop_prob
        for block in backbone.modules()
        for attr in ("drop_path1", "drop_path2")
        if hasattr(block, attr)
    ]
    assert rates == [0.3] * 8  # 4 blocks x 2 branches, the first block too (timm: 0 there)
    ramp, _ = A.build_model(
        cfg, "dinov2", dataclasses.replace(DINOV2, drop_path_uniform=False), bands, stats, 1
    )
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
        others = [
            g["lr"] / g["lr_scale"] for g in optimizer.param_groups if "frozen_until" not in g
        ]
        assert others == pytest.approx([schedules.lr_at(step)] * len(others))
        assert lrs == pytest.approx(
            [expected * g["lr_scale"] for g in optimizer.param_groups if "frozen_until" in g]
        )
    # the gain gets a gradient and moves once its lr is on
    views = D.DinoV2Views(14, D.CropSizes(28, 14))
    import numpy as np

    images = torch.rand(4, 1, 3, 40, 40) * 3000
    batch = torch.utils.data.default_collate(
        [views(np.random.default_rng(i), images[i].numpy()) for i in range(4)]
    )
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
        return (
            {"backbone": [self.backbone.weight], "head": [self.head.weight]}
            if self.separate
            else None
        )


@pytest.mark.parametrize("separate", [True, False])
def test_backbone_and_head_are_clipped_separately(separate):
    from geoexplora.train import engine as E

    fabric = E.make_fabric(E.FabricSettings(accelerator="cpu"), launch=False)
    objective = _TwoPart(separate)
    optimizer = E.build_optimizer(E.param_groups(objective))
    loop = E.TrainLoop(
        fabric,
        objective,
        optimizer,
        [],
        E.LoopSettings(output="unused.pt", steps=1, batch_size=1, clip_grad=3.0),
        E.Schedules(1, 0.0),
    )
    objective.backbone.weight.grad = torch.full((4, 4), 10.0 / 4)  # norm 10
    objective.head.weight.grad = torch.full((4, 4), 1.0 / 4)  # norm 1
    terms = loop._clip_and_measure()
    assert terms["grad_norm"].item() == pytest.approx((100 + 1) ** 0.5)
    backbone, head = (
        objective.backbone.weight.grad.norm().item(),
        objective.head.weight.grad.norm().item(),
    )
    if separate:  # DINOv2: each at 3.0, the head's small gradient untouched
        assert (backbone, head) == (pytest.approx(3.0, rel=1e-5), pytest.approx(1.0))
    else:  # one clip scales both by 3 / sqrt(101)
        scale = 3.0 / 101**0.5
        assert (backbone, head) == (
            pytest.approx(10 * scale, rel=1e-5),
            pytest.approx(scale, rel=1e-5),
        )


# --- DINOv2's colour augmentations and their spectral analogues ---------------------------------

IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def _params(bands, **extra):
    base = {
        "theta": torch.tensor([IDENTITY]),
        "gain": torch.ones(1, bands),
        "contrast": torch.ones(1),
        "sigma": torch.zeros(1),
    }
    return base | {k: torch.tensor([float(v)]) for k, v in extra.items()}


def _image(bands=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(1, 1, bands, 16, 16, generator=g) * 1000
        + torch.arange(bands).view(1, 1, bands, 1, 1) * 500.0
    )


def test_solarize_and_grayscale_are_drawn_for_the_right_crops_at_dinov2_rates():
    import numpy as np

    views = D.DinoV2Views(14, D.CropSizes(28, 14))
    draws = [
        views(np.random.default_rng([7, i]), np.zeros((1, 4, 40, 40), np.float32))
        for i in range(2000)
    ]
    solar = torch.stack([d["global"]["solarize"] for d in draws])  # (n, 2)
    assert solar[:, 0].sum() == 0  # never the first global crop
    assert solar[:, 1].mean().item() == pytest.approx(0.2, abs=0.02)
    assert sum(d["local"]["solarize"].sum() for d in draws) == 0
    gray = torch.cat(
        [torch.cat([d["global"]["grayscale"], d["local"]["grayscale"]]) for d in draws]
    )
    assert gray.mean().item() == pytest.approx(0.2, abs=0.01)
    saturation = torch.stack([d["global"]["saturation"] for d in draws]).flatten()
    jittered = saturation != 1
    assert jittered.float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert saturation.min() >= 0.8 and saturation.max() <= 1.2


def test_rgb_grayscale_is_the_luma_in_every_channel():
    x = _image(3)
    out = AUG.render_views(x, _params(3, grayscale=1), 16, rgb=(2, 1, 0))  # bands B, G, R
    luma = 0.299 * x[:, :, 2] + 0.587 * x[:, :, 1] + 0.114 * x[:, :, 0]
    for c in range(3):
        torch.testing.assert_close(out[:, :, c], luma)


def test_spectral_grayscale_keeps_each_bands_mean_and_spread_and_drops_spectral_contrast():
    x = _image(5)
    out = AUG.render_views(x, _params(5, grayscale=1), 16)[0, 0]
    src = x[0, 0]
    torch.testing.assert_close(out.mean(dim=(-2, -1)), src.mean(dim=(-2, -1)))
    z = (out - out.mean(dim=(-2, -1), keepdim=True)) / out.std(dim=(-2, -1), keepdim=True)
    for c in range(1, 5):  # every band shows one pattern
        torch.testing.assert_close(z[c], z[0], atol=1e-4, rtol=0)
    # the spread of each grey band is its own std times that of the mean z-score (< 1)
    ratio = out.std(dim=(-2, -1)) / src.std(dim=(-2, -1))
    assert torch.allclose(ratio, ratio[0].expand(5), atol=1e-4) and ratio[0] < 1


def test_saturation_scales_the_distance_to_the_grey_image():
    x = _image(4)
    grey = AUG.render_views(x, _params(4, grayscale=1), 16)
    for s in (0.0, 0.8, 1.2):
        out = AUG.render_views(x, _params(4, saturation=s), 16)
        torch.testing.assert_close(out - grey, s * (x - grey), atol=1e-2, rtol=1e-4)


def test_hue_turns_rgb_chroma_keeps_luma_and_leaves_multispectral_alone():
    x = _image(3)
    half = AUG.render_views(x, _params(3, hue=0.5), 16, rgb=(0, 1, 2))
    luma = lambda v: 0.299 * v[:, :, 0] + 0.587 * v[:, :, 1] + 0.114 * v[:, :, 2]
    torch.testing.assert_close(luma(half), luma(x), atol=1e-2, rtol=1e-5)
    assert (half - x).abs().mean() > 50  # the chroma turned
    full = AUG.render_views(x, _params(3, hue=1.0), 16, rgb=(0, 1, 2))
    torch.testing.assert_close(full, x, atol=1e-2, rtol=1e-5)
    torch.testing.assert_close(
        AUG.render_views(x, _params(3, hue=0.5), 16), x, atol=1e-2, rtol=1e-5
    )


def test_solarize_inverts_each_band_above_the_middle_of_its_range():
    ramp = torch.linspace(0, 100, 16 * 16).view(1, 1, 1, 16, 16).repeat(1, 1, 2, 1, 1)
    ramp[:, :, 1] += 1000  # another band, another range: its own middle
    out = AUG.render_views(ramp, _params(2, solarize=1), 16)
    for c, lo in ((0, 0.0), (1, 1000.0)):
        band, src = out[0, 0, c], ramp[0, 0, c]
        high = src >= lo + 50
        torch.testing.assert_close(band[high], 2 * lo + 100 - src[high])
        torch.testing.assert_close(band[~high], src[~high])
        assert band.max().item() <= lo + 50 + 1e-3
    torch.testing.assert_close(
        AUG.render_views(ramp, _params(2, solarize=0), 16), ramp, atol=1e-2, rtol=1e-5
    )


def test_rgb_sources_get_the_rgb_colour_ops():
    from geoexplora import bands as B

    rgb = [B.find_band("sentinel2", b) for b in ("B4", "B3", "B2")]
    assert A.rgb_indices(rgb) == (0, 1, 2)
    assert A.rgb_indices([B.find_band("sentinel2", b) for b in ("B2", "B3", "B4", "B8")]) is None


def test_crops_are_drawn_from_a_2x_context_window_where_the_scene_allows(tmp_path):
    from geoexplora.defaults import DATA

    scene = sample.slovenia_scenes()[:1]  # 100 x 101 px
    assert DATA.context_factor == 2.0

    def data(crop, factor):
        cfg = A.AdaptConfig(
            inputs=scene, output=tmp_path / "x.pt", bands=["B2", "B3", "B4"], crop_size=crop
        )
        return A.load_data(cfg, crop, context=factor)

    wide = data(28, 2.0)
    assert wide.description["window"] == 56 and wide.description["crop"] == 28
    assert wide.dataset[0]["image"].shape[-2:] == (56, 56)
    assert wide.epoch_size == data(28, 1.0).epoch_size  # an epoch: valid area / crop area
    assert data(42, 2.0).description["window"] == 84
    assert data(56, 2.0).description["window"] == 100  # 112 does not fit: the largest that does
    assert data(56, 1.0).description["window"] == 56


def test_a_peak_lr_below_the_recipes_floor_never_rises(tmp_path, tiny_weights):
    out = tmp_path / "tiny-lr.pt"
    A.adapt(
        A.AdaptConfig(
            inputs=sample.slovenia_scenes()[:1],
            output=out,
            bands=["B2", "B3", "B4", "B8"],
            init=TINY,
            init_weights=str(tiny_weights),
            steps=4,
            batch_size=2,
            crop_size=56,
            local_crop_size=28,
            local_crops=0,
            num_workers=0,
            lr=1e-12,
            warmup_steps=0,
            progress=False,
        )
    )
    lrs = [
        json.loads(line)["lr"] for line in (tmp_path / "tiny-lr.log.jsonl").read_text().splitlines()
    ]
    assert max(lrs) <= 1e-12
