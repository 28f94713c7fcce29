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
    assert copy["student_entropy"].item() == pytest.approx(copy["teacher_entropy"].item(),
                                                            abs=1e-5)


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
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad],
                                  lr=lr, weight_decay=0.0)
    records = []
    for step in range(steps):
        out = objective(_batch(views, images, step), step)
        out["loss"].backward()
        objective.before_optimizer_step(step)
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


def test_stop_if_stalled_ends_a_run_at_a_vanishing_lr_with_exit_1_and_keeps_the_checkpoint(tmp_path):
    from conftest import run_cli
    from factories import timm_model
    from test_adapt import TINY

    from geoexplora import sample

    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    out = tmp_path / "stalled.pt"
    code, _, stderr = run_cli(
        "adapt", "--bands", "B2,B3,B4,B8", str(sample.slovenia_scenes()[0]), "-o", str(out),
        "--init", TINY, "--init-weights", str(weights), "--steps", "30", "--batch-size", "2",
        "--crop-size", "56", "--local-crops", "0", "--num-workers", "0", "--lr", "1e-12",
        "--stop-if-stalled")
    assert code == 1, stderr
    assert "not learning: kl_dino" in stderr and "--stop-if-stalled" in stderr
    assert (tmp_path / "stalled.ckpt").is_file() and not out.exists()
    ckpt = torch.load(tmp_path / "stalled.ckpt", weights_only=True)
    assert ckpt["step"] < 30
