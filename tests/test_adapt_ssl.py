"""The pieces of adapt's objectives and data: augmentation, DINOv2 and MAE losses, EMA,
window sampling. Pure torch/numpy where possible; the sampling test reads the bundled sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoexplora.ssl import augment as AUG
from geoexplora.ssl import dinov2 as D
from geoexplora.ssl import mae as M


def params(theta, bands=1, gain=None, contrast=1.0, sigma=0.0, batch=1):
    return {
        "theta": torch.as_tensor(theta, dtype=torch.float32).expand(batch, 2, 3),
        "gain": torch.ones(batch, bands) if gain is None else torch.as_tensor(gain),
        "contrast": torch.full((batch,), contrast),
        "sigma": torch.full((batch,), sigma),
    }


IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


# --- augmentation ------------------------------------------------------------------------------


def test_identity_view_returns_the_image_and_keeps_nodata():
    x = torch.rand(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1000
    x[0, 1, :, 2, 5] = float("nan")
    out = AUG.render_views(x, params(IDENTITY, bands=3), 8)
    assert torch.isnan(out[0, 1, :, 2, 5]).all()
    assert torch.isnan(out).sum() == 3
    # grid_sample's identity grid is exact to float rounding: ~1e-5 of a neighbour difference
    torch.testing.assert_close(torch.nan_to_num(out), torch.nan_to_num(x), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_matrices_render_exact_90_degree_rotations(k):
    x = torch.arange(16.0).view(1, 1, 1, 4, 4)
    m = AUG._ROTATIONS[k]
    theta = [[m[0, 0], m[0, 1], 0.0], [m[1, 0], m[1, 1], 0.0]]
    assert torch.equal(AUG.render_views(x, params(theta), 4), torch.rot90(x, k, dims=(-2, -1)))


def test_horizontal_flip_and_crop_of_the_left_half():
    x = torch.arange(32.0).view(1, 1, 1, 4, 8)
    flipped = AUG.render_views(x, params([[-1.0, 0, 0], [0, 1.0, 0]]), 4)
    assert torch.equal(
        flipped,
        torch.nn.functional.interpolate(
            x.flip(-1)[0], size=(4, 4), mode="bilinear", align_corners=False
        )[None],
    )
    left = AUG.render_views(x, params([[0.5, 0, -0.5], [0, 1.0, 0]]), 4)
    assert torch.equal(left, x[..., :4])


def test_band_gain_and_contrast_act_per_band():
    x = torch.stack([torch.full((4, 4), 100.0), torch.arange(16.0).view(4, 4)]).view(1, 1, 2, 4, 4)
    out = AUG.render_views(x, params(IDENTITY, bands=2, gain=[[2.0, 1.0]], contrast=0.5), 4)
    assert torch.equal(out[0, 0, 0], torch.full((4, 4), 200.0))
    assert out[0, 0, 1].std() == pytest.approx(x[0, 0, 1].std().item() * 0.5, rel=1e-5)
    assert out[0, 0, 1].mean() == pytest.approx(7.5, rel=1e-5)


def test_blur_smooths_but_keeps_a_constant_image():
    noise = torch.rand(1, 1, 1, 16, 16)
    blurred = AUG.render_views(noise, params(IDENTITY, sigma=1.5), 16)
    assert blurred.std() < 0.6 * noise.std()
    flat = AUG.render_views(torch.full((1, 1, 1, 16, 16), 7.0), params(IDENTITY, sigma=2.0), 16)
    torch.testing.assert_close(flat, torch.full_like(flat, 7.0))


def test_drawn_views_are_reproducible_and_stay_inside_the_image():
    spec = AUG.ViewSpec(16, (0.05, 0.32), blur_p=0.5)
    a = AUG.draw_view(np.random.default_rng([0, 5]), 64, 64, 4, spec)
    b = AUG.draw_view(np.random.default_rng([0, 5]), 64, 64, 4, spec)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for seed in range(50):
        v = AUG.draw_view(np.random.default_rng(seed), 64, 48, 4, spec)
        half_w, half_h = np.abs(v["theta"][:, :2]).sum(axis=1)
        assert abs(v["theta"][0, 2]) + half_w <= 1 + 1e-6
        assert abs(v["theta"][1, 2]) + half_h <= 1 + 1e-6


# --- DINOv2 ------------------------------------------------------------------------------------


def test_sinkhorn_targets_are_distributions_that_use_all_prototypes_equally():
    logits = torch.randn(64, 8) + 0.3 * torch.arange(8.0)  # prototype 7 favoured
    assert (logits.argmax(dim=1) == 7).sum() > 16
    q = D.sinkhorn_knopp(logits, temperature=0.5, iterations=20)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 8.0), rtol=0.05, atol=0)


def test_koleo_is_lower_for_spread_features_than_for_clustered_ones():
    spread = torch.eye(8)
    clustered = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    assert D.koleo(spread) < D.koleo(clustered)


def test_block_mask_masks_exactly_the_requested_patches():
    for count in (0, 1, 5, 12):
        mask = D.block_mask(np.random.default_rng(count), 4, 6, count)
        assert mask.shape == (24,) and mask.sum() == count


def test_dino_head_outputs_cosine_similarities():
    from geoexplora.ssl.heads import DinoHead

    out = DinoHead(16, 32, hidden=24, bottleneck=8)(torch.randn(5, 16))
    assert out.shape == (5, 32) and out.abs().max() <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def tiny_dinov2():
    from geoexplora.models import apply_explora, build_backbone

    torch.manual_seed(0)
    vit = build_backbone(init="geo_vit_tiny_patch14", init_weights="random", img_size=28)
    apply_explora(vit, lora_rank=4)
    objective = D.DinoV2Objective(
        vit, D.DinoHeadSize(32, 16, 64), D.CropSizes(28, 14), total_steps=100
    )
    return objective


def test_teacher_shares_the_frozen_weights_and_copies_the_trainable_ones(tiny_dinov2):
    s = dict(tiny_dinov2.student.named_parameters())
    t = dict(tiny_dinov2.teacher.named_parameters(remove_duplicate=False))
    for name, param in s.items():
        assert (t[name] is param) == (not param.requires_grad), name
    assert not any(p.requires_grad for p in t.values())


def test_ema_moves_the_teacher_towards_the_student_by_the_momentum(tiny_dinov2):
    student = tiny_dinov2.student["head"].direction
    teacher = tiny_dinov2.teacher["head"].direction
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.detach().clone()
    tiny_dinov2.after_optimizer_step(0)
    m = tiny_dinov2.momentum(0)
    assert m == pytest.approx(0.992)
    torch.testing.assert_close(teacher, m * before + (1 - m) * student.detach())


def test_forward_returns_finite_terms_and_the_prototypes_get_gradients():
    from geoexplora.models import apply_explora, build_backbone

    torch.manual_seed(0)
    vit = build_backbone(init="geo_vit_tiny_patch14", init_weights="random", img_size=28)
    apply_explora(vit, lora_rank=4)
    objective = D.DinoV2Objective(
        vit, D.DinoHeadSize(32, 16, 64), D.CropSizes(28, 14), total_steps=200
    )
    views = D.DinoV2Views(14, D.CropSizes(28, 14))
    images = torch.rand(3, 1, 3, 40, 40) * 3000
    samples = [views(np.random.default_rng(i), images[i].numpy()) for i in range(3)]
    batch = torch.utils.data.default_collate(samples)
    batch["image"] = images
    out = objective(batch, step=0)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss"].item() == pytest.approx(
        (out["loss_dino"] + out["loss_ibot"] + 0.1 * out["loss_koleo"]).item()
    )
    out["loss"].backward()
    assert objective.freeze_last_layer_steps == 4  # 2 % of 200 steps
    head = objective.student["head"]
    assert head.direction.grad is not None and head.gain.grad is not None
    assert head.gain.grad.abs().sum() > 0
    assert {id(p) for p in objective.last_layer_parameters()} == {id(head.direction), id(head.gain)}


def _tiny_scratch_objective(init_values, prototypes=16, steps=30, seed=0):
    """A randomly initialised tiny ViT, fully trainable, under DINO alone (no local crops, no
    iBOT masks, no KoLeo), with LayerScale gammas initialised to ``init_values``."""
    import dataclasses

    from geoexplora.models import build_backbone

    torch.manual_seed(seed)
    vit = build_backbone(
        init="geo_vit_tiny_patch14",
        init_weights="random",
        img_size=28,
        arch_overrides={"init_values": init_values},
    )
    vit.requires_grad_(True)
    settings = dataclasses.replace(D.DINOV2, local_crops=0, mask_probability=0.0, koleo_weight=0.0)
    objective = D.DinoV2Objective(
        vit,
        D.DinoHeadSize(32, 16, prototypes),
        D.CropSizes(28, 14),
        total_steps=steps,
        settings=settings,
    )
    return objective, D.DinoV2Views(14, D.CropSizes(28, 14), settings)


def _distinct_images(n=8):
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(n, 1, 3, 42, 42, generator=g) * 2000
        + torch.rand(n, 1, 3, 1, 1, generator=g) * 8000
    )


def _batch(views, images, step):
    samples = [
        views(np.random.default_rng([step, i]), images[i].numpy()) for i in range(len(images))
    ]
    batch = torch.utils.data.default_collate(samples)
    batch["image"] = images
    return batch


@pytest.mark.parametrize("init_values, uniform", [(1e-5, True), (1.0, False)])
def test_teacher_targets_of_a_random_vit_are_uniform_when_layer_scale_mutes_the_blocks(
    init_values, uniform
):
    """LayerScale 1e-5 (timm's DINOv2 value, right for fine-tuning) makes a randomly initialised
    ViT nearly the identity: every image's class token is the same, Sinkhorn-Knopp spreads each
    target over all prototypes, and DINO has nothing to learn (the loss sits at ln K)."""
    objective, views = _tiny_scratch_objective(init_values)
    batch = _batch(views, _distinct_images(), 0)
    targets = []
    original = objective._targets

    def recording_targets(logits, center, temp):
        targets.append(original(logits, center, temp))
        return targets[-1]

    objective._targets = recording_targets
    with torch.no_grad():
        objective(batch, 0)
    q = targets[0]  # the class-token targets (the first call; the second is iBOT's)
    entropy = -(q * q.log()).sum(dim=1).mean().item()
    assert (entropy == pytest.approx(math.log(16), abs=1e-3)) == uniform


def test_dino_loss_of_a_random_vit_falls_below_the_uniform_level_when_it_learns():
    objective, views = _tiny_scratch_objective(1.0, steps=30)
    images = _distinct_images()
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0
    )
    losses = []
    for step in range(30):
        out = objective(_batch(views, images, step), step)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step(step)
        losses.append(out["loss_dino"].item())
    assert sum(losses[-5:]) / 5 < math.log(16) - 0.1


def test_the_local_crops_option_reaches_the_objective_settings(tmp_path):
    from geoexplora.pipelines.adapt import AdaptConfig, run_settings

    cfg = AdaptConfig(inputs=[], output=tmp_path / "m.pt", local_crops=3)
    assert run_settings(cfg, "dinov2").local_crops == 3
    cfg.settings_overrides = {"local_crops": 5}
    assert run_settings(cfg, "dinov2").local_crops == 5


def test_arch_overrides_reach_the_backbone(tmp_path):
    from geoexplora.bands import get_band
    from geoexplora.pipelines.adapt import AdaptConfig, build_model, run_settings

    cfg = AdaptConfig(
        inputs=[],
        output=tmp_path / "m.pt",
        init="geo_vit_tiny_patch14",
        init_weights="random",
        crop_size=28,
        full=True,
        arch_overrides={"init_values": 0.5},
    )
    bands = [get_band("sentinel2", b) for b in ("B4", "B3", "B2")]
    stats = {"mean": [1000.0] * 3, "std": [500.0] * 3}
    backbone, _ = build_model(cfg, "dinov2", run_settings(cfg, "dinov2"), bands, stats, 1)
    gammas = [block.ls1.gamma for block in backbone.vit.blocks]
    assert all(torch.equal(g, torch.full_like(g, 0.5)) for g in gammas)


# --- MAE ---------------------------------------------------------------------------------------


def test_patchify_orders_pixels_as_mae_does():
    x = torch.arange(2 * 4 * 4.0).view(1, 2, 4, 4)
    patches = M.patchify(x, 2)
    assert patches.shape == (1, 4, 8)
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # (row, col, channel)


def test_mae_loss_leaves_nodata_out():
    from geoexplora.models import apply_explora, build_backbone

    torch.manual_seed(0)
    vit = build_backbone(init="geo_vit_tiny_patch16", init_weights="random", img_size=32)
    apply_explora(vit, lora_rank=4)
    objective = M.MaeObjective(vit, 32)
    assert objective.decoder_source == "new"
    image = torch.rand(2, 1, 3, 32, 32) * 3000
    batch = {
        "view": {k: v.unsqueeze(1) for k, v in params(IDENTITY, 3, batch=2).items()},
        "noise": torch.rand(2, 4),
    }
    clean = objective({**batch, "image": image}, 0)["loss"]
    spoiled = image.clone()
    order = torch.argsort(batch["noise"], dim=1)
    masked_token = order[0, -1].item()  # a masked token of image 0: its pixels -> garbage, nodata
    row, col = divmod(masked_token, 2)
    spoiled[0, 0, :, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = float("nan")
    out = objective({**batch, "image": spoiled}, 0)["loss"]
    assert torch.isfinite(out) and not torch.isclose(out, clean)


# --- sampling ----------------------------------------------------------------------------------


def test_windows_come_from_the_valid_area(tmp_path):
    import rasterio

    from geoexplora import sample
    from geoexplora.io.scene import SceneOptions, open_scene
    from geoexplora.train.sampling import SceneWindows, valid_fraction

    src = sample.slovenia_scenes()[0]
    half = tmp_path / "S2L1C_2015-07-11_half.tif"
    with rasterio.open(src) as ds:
        data, profile, descriptions = ds.read(), ds.profile, ds.descriptions
    data[:, :, :50] = np.nan  # the western half is nodata
    with rasterio.open(half, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = descriptions
    scene = open_scene([half], SceneOptions(bands=["B2", "B3", "B4", "B8"]))
    windows = SceneWindows([scene], size=16, seed=0, cell=16)
    west = [w for c, w in zip(windows.cells, windows.probs) if c.col + c.width <= 50]
    assert sum(west) == 0
    for i in range(20):
        image = windows[i]["image"]
        assert image.shape == (1, 4, 16, 16)
        assert valid_fraction(image.numpy()) >= 0.5
    assert torch.equal(torch.nan_to_num(windows[3]["image"]), torch.nan_to_num(windows[3]["image"]))


def test_windows_of_a_real_scene_with_a_nodata_collar(shared_data):
    """rasterio's RGB.byte.tif: a rotated Landsat footprint in a nodata (0) frame."""
    from geoexplora.io.scene import SceneOptions, open_scene
    from geoexplora.train.sampling import SceneWindows, valid_fraction

    scene = open_scene([shared_data / "rgb-byte" / "RGB.byte.tif"], SceneOptions(sensor="rgb"))
    windows = SceneWindows([scene], size=64, seed=1, cell=64)
    full = scene.read()
    valid = np.isfinite(full).all(axis=1).all(axis=0)
    assert windows.valid_pixels == int(valid.sum())
    assert 0.3 < valid.mean() < 0.9  # the collar is real
    assert (
        sum(
            p
            for c, p in zip(windows.cells, windows.probs)
            if not valid[c.row : c.row + c.height, c.col : c.col + c.width].any()
        )
        == 0
    )
    fractions = [valid_fraction(windows[i]["image"].numpy()) for i in range(12)]
    assert min(fractions) >= 0.5
