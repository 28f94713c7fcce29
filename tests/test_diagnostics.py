"""Learning diagnostics of the objectives and the "not learning" rule."""

from __future__ import annotations

import math

import pytest
import torch
from test_adapt_ssl import _batch, _distinct_images, _tiny_scratch_objective

from geoexplora.ssl import dinov2 as D
from geoexplora.ssl import mae as M
from geoexplora.train.diagnostics import stall_reason


def test_uniform_student_has_entropy_ln_k_and_a_copied_teacher_has_kl_zero():
    k = 16
    teacher_logits = torch.randn(6, k, generator=torch.Generator().manual_seed(0))
    teacher = torch.softmax(teacher_logits / 0.1, dim=-1)
    uniform = D.dino_diagnostics(torch.zeros(6, k), teacher, 0.1, n_global=2)
    assert uniform["student_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)
    copy = D.dino_diagnostics(teacher_logits, teacher, 0.1, n_global=2)
    loss = D.cross_entropy(teacher_logits, teacher, 0.1).mean()
    assert (loss - copy["teacher_entropy"]).item() == pytest.approx(0.0, abs=1e-5)
    assert copy["student_entropy"].item() == pytest.approx(copy["teacher_entropy"].item(), abs=1e-5)


def test_view_agreement_counts_images_whose_two_crops_share_the_teacher_prototype():
    first = torch.eye(4)[[0, 1, 2, 3]]
    second = torch.eye(4)[[0, 1, 3, 2]]
    out = D.dino_diagnostics(torch.zeros(8, 4), torch.cat([first, second]), 0.1, n_global=2)
    assert out["view_agreement"].item() == 0.5


def test_mean_patch_baseline_is_the_error_of_the_mean_masked_patch():
    target = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]])  # one image, 3 patches
    valid = torch.ones_like(target, dtype=torch.bool)
    masked = torch.tensor([[1.0, 1.0, 0.0]])  # the third patch is visible
    assert M.mean_patch_baseline(target, valid, masked).item() == pytest.approx(1.0)


def _records(init_values, lr, images, steps=30):
    objective, views = _tiny_scratch_objective(init_values, steps=steps)
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    records = []
    for step in range(steps):
        out = objective(_batch(views, images, step), step)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step(step)
        records.append({"step": step + 1, **{k: v.item() for k, v in out.items()}})
    return records


def test_stall_rule_fires_on_identical_images_a_muted_random_vit_and_lr_zero():
    records = _records(1e-5, 0.0, _distinct_images(1).repeat(8, 1, 1, 1, 1))
    assert records[0]["teacher_entropy"] == pytest.approx(math.log(16), abs=1e-2)
    reason = stall_reason(records)
    assert reason is not None and reason.startswith("not learning: kl_dino")


def test_stall_rule_stays_silent_on_a_run_that_learns():
    records = _records(1.0, 1e-3, _distinct_images())
    assert records[-1]["kl_dino"] < 0.5 * records[0]["kl_dino"]
    assert stall_reason(records) is None


def test_stall_rule_waits_for_enough_records():
    flat = [{"step": i, "loss": 1.0} for i in range(1, 6)]
    assert stall_reason(flat) is None
    assert stall_reason(flat * 2) is not None


def test_stop_if_stalled_ends_a_run_at_a_vanishing_lr_with_exit_1_and_keeps_the_checkpoint(
    tmp_path,
):
    from conftest import run_cli
    from factories import timm_model
    from test_adapt import TINY

    from geoexplora import sample

    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    out = tmp_path / "stalled.pt"
    code, _, stderr = run_cli(
        "adapt",
        "--bands",
        "B2,B3,B4,B8",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(out),
        "--init",
        TINY,
        "--init-weights",
        str(weights),
        "--steps",
        "30",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--local-crops",
        "0",
        "--num-workers",
        "0",
        "--lr",
        "1e-12",
        "--stop-if-stalled",
    )
    assert code == 1, stderr
    assert "not learning: kl_dino" in stderr and "--stop-if-stalled" in stderr
    assert (tmp_path / "stalled.ckpt").is_file() and not out.exists()
    ckpt = torch.load(tmp_path / "stalled.ckpt", weights_only=True)
    assert ckpt["step"] < 30


def test_prototype_max_mass_is_one_over_k_when_spread_and_one_when_collapsed():
    k = 8
    assert D.prototype_max_mass(torch.full((6, k), 1 / k)).item() == pytest.approx(1 / k)
    assert D.prototype_max_mass(torch.eye(k)).item() == pytest.approx(1 / k)
    collapsed = torch.zeros(6, k)
    collapsed[:, 3] = 1.0
    assert D.prototype_max_mass(collapsed).item() == pytest.approx(1.0)
    half = torch.eye(k)[[0, 0, 0, 1, 2, 3]]
    assert D.prototype_max_mass(half).item() == pytest.approx(0.5)
    # Sinkhorn-Knopp's (3 iterations) pull the mass a raw teacher puts on one prototype back
    # towards 1/K
    logits = torch.randn(32, k, generator=torch.Generator().manual_seed(0))
    logits[:, 0] += 5.0
    assert D.prototype_max_mass(torch.softmax(logits / 0.1, dim=-1)).item() > 0.99
    assert D.prototype_max_mass(D.sinkhorn_knopp(logits, 0.1)).item() == pytest.approx(
        0.281, abs=1e-3
    )


def _synthetic(n, **columns):
    return [
        {"step": i + 1, **{k: (v(i) if callable(v) else v) for k, v in columns.items()}}
        for i in range(n)
    ]


def test_stall_rule_flags_collapse_once_there_are_enough_records():
    records = _synthetic(
        12,
        kl_dino=lambda i: 2.0 - 0.1 * i,
        prototype_max_mass=0.8,
        student_entropy=1.0,
        uniform_entropy=math.log(16),
    )
    assert stall_reason(records[:9]) is None  # too early
    reason = stall_reason(records)
    assert reason.startswith("not learning: collapsed, one prototype takes 80%")
    healthy = _synthetic(
        12,
        kl_dino=lambda i: 2.0 - 0.1 * i,
        prototype_max_mass=1 / 16,
        student_entropy=1.0,
        uniform_entropy=math.log(16),
    )
    assert stall_reason(healthy) is None


def test_stall_rule_flags_a_uniform_student_whose_kl_stopped_falling():
    ln_k = math.log(16)
    # KL fell a lot early (the whole-run rule is satisfied) but the last 10 records sit still
    # with a student at ln K
    records = _synthetic(
        20,
        kl_dino=lambda i: 2.0 if i < 5 else 0.5,
        student_entropy=0.995 * ln_k,
        uniform_entropy=ln_k,
        prototype_max_mass=1 / 16,
    )
    reason = stall_reason(records)
    assert reason.startswith("not learning: the student's output is uniform")
    assert "ln K = 2.773" in reason
    # the same KL curve with a student that is not uniform: learning (then converged)
    confident = [dict(r, student_entropy=0.9 * ln_k) for r in records]
    assert stall_reason(confident) is None


def _identical_views_run(steps=100, lr=1e-3):
    """The identical-views control: no augmentation, both global crops the whole image (one
    crop, seen by student and teacher alike), distinct images, LayerScale 1.0."""
    import dataclasses

    from geoexplora.defaults import AUGMENT

    objective, _ = _tiny_scratch_objective(1.0, steps=steps)
    settings = dataclasses.replace(objective.settings, global_crops_scale=(1.0, 1.0))
    objective.settings = settings
    no_aug = dataclasses.replace(
        AUGMENT,
        hflip_p=0.0,
        vflip_p=0.0,
        rot90_p=0.0,
        jitter_p=0.0,
        blur_p_global=(0.0, 0.0),
        blur_p_local=0.0,
    )
    views = D.DinoV2Views(14, D.CropSizes(28, 14), settings, no_aug)
    images = _distinct_images()
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    records = []
    for step in range(steps):
        batch = _batch(views, images, step)
        out = objective(batch, step)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step(step)
        records.append({"step": step + 1, **{k: v.item() for k, v in out.items()}})
    return batch, records


def test_identical_views_control_learns_and_the_stall_rule_stays_silent():
    batch, records = _identical_views_run()
    torch.testing.assert_close(batch["global"]["theta"][:, 0], batch["global"]["theta"][:, 1])
    ln_k = math.log(16)
    first_below = next(r["step"] for r in records if r["loss_dino"] < ln_k - 0.1)
    assert first_below <= 100
    assert records[-1]["view_agreement"] == 1.0  # both crops are one image
    assert records[-1]["kl_dino"] < 0.5 * records[0]["kl_dino"]
    for n in range(10, len(records) + 1, 10):  # as the engine checks it, record by record
        assert stall_reason(records[:n]) is None, n


def test_a_noisy_but_stationary_signal_is_not_learning_and_a_noisy_fall_is():
    import random

    rng = random.Random(0)
    flat = _synthetic(40, kl_dino=lambda i: 1.2 + rng.gauss(0, 0.2))
    assert stall_reason(flat).startswith("not learning: kl_dino went from")
    falling = _synthetic(40, kl_dino=lambda i: 1.2 - 0.02 * i + rng.gauss(0, 0.2))
    assert stall_reason(falling) is None


def test_the_reference_kl_ignores_the_teacher_temperature_warm_up():
    """kl_dino_ref uses the targets at the final teacher temperature: during the warm-up it
    differs from kl_dino, and at a zero learning rate it does not drift with the temperature."""
    objective, views = _tiny_scratch_objective(1.0, steps=20)
    images = _distinct_images()
    with torch.no_grad():
        early = objective(_batch(views, images, 0), 0)
        late = objective(_batch(views, images, 0), 10)  # same batch, warm-up over (30 % of 20)
    assert objective.teacher_temp(0) == 0.04 and objective.teacher_temp(10) == 0.07
    assert abs(early["kl_dino"] - early["kl_dino_ref"]) > 1e-3
    assert late["kl_dino"] == late["kl_dino_ref"]
    torch.testing.assert_close(early["kl_dino_ref"], late["kl_dino_ref"])
