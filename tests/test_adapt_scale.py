"""adapt at scale: --preset, --global-batch, the small-batch warning and the --dry-run budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import TINY, timm_model

from geoexplora import sample
from geoexplora.defaults import ADAPT_PRESETS, DINOV2, SCALE
from geoexplora.errors import UserError, cli_flag
from geoexplora.pipelines import adapt as A


def _cfg(**kw) -> A.AdaptConfig:
    return A.AdaptConfig(inputs=[Path("scene.tif")], output=Path("out.pt"), **kw)


def test_paper_preset_reaches_1024_by_accumulation_over_devices_and_batch():
    cfg = A.resolve_scale(_cfg(preset="paper"), world=4)
    assert (cfg.batch_size, cfg.accumulate, cfg.steps) == (8, 32, 150_000)
    assert cfg.head_prototypes == 65536 and cfg.local_crops == 8
    assert A.resolve_scale(_cfg(preset="paper"), world=1).accumulate == 128
    assert A.base_lr("dinov2", DINOV2, 8 * 32 * 4) == pytest.approx(1e-3)


def test_explicit_options_override_the_preset():
    cfg = A.resolve_scale(
        _cfg(preset="paper", batch_size=16, steps=10, head_prototypes=256, local_crops=2), world=2
    )
    assert (cfg.batch_size, cfg.accumulate, cfg.steps) == (16, 32, 10)
    assert (cfg.head_prototypes, cfg.local_crops) == (256, 2)
    # --accumulate alone replaces the preset's global batch
    assert A.resolve_scale(_cfg(preset="quick", accumulate=1), world=1).accumulate == 1
    quick = A.resolve_scale(_cfg(preset="quick"), world=1)
    assert quick.batch_size * quick.accumulate == ADAPT_PRESETS["quick"].global_batch == 256


def test_no_preset_keeps_the_defaults_and_global_batch_sets_accumulation():
    cfg = A.resolve_scale(_cfg(), world=1)
    assert (cfg.batch_size, cfg.accumulate, cfg.steps, cfg.local_crops) == (8, 1, None, 8)
    assert A.resolve_scale(_cfg(batch_size=4, global_batch=64), world=2).accumulate == 8


def test_a_global_batch_that_does_not_divide_is_refused_naming_the_options():
    with pytest.raises(UserError) as err:
        A.resolve_scale(_cfg(batch_size=6, global_batch=1024), world=4)
    text = err.value.render(cli_flag)
    assert text.startswith("--global-batch: 1024 is not a whole number of micro-batches")
    assert "--batch-size 6 x 4 device(s) = 24" in text and "--devices" in text
    with pytest.raises(UserError, match="needs accumulate 8"):
        A.resolve_scale(_cfg(batch_size=4, global_batch=32, accumulate=2), world=1)


def test_the_small_batch_warning_counts_all_ranks():
    small = A.resolve_scale(_cfg(batch_size=8), world=2)
    (warning,) = A.scale_warnings(small, "dinov2", DINOV2, world=2)
    assert (
        "over 16 image(s) per micro-batch" in warning
        and f"below {SCALE.min_sinkhorn_batch}" in warning
    )
    assert (
        A.scale_warnings(A.resolve_scale(_cfg(batch_size=8), world=4), "dinov2", DINOV2, world=4)
        == []
    )
    assert A.scale_warnings(small, "mae", None, world=2) == []


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), path)
    return path


def _dry_run(tmp_path, weights, *args):
    code, stdout, stderr = run_cli(
        "adapt",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(tmp_path / "plan.pt"),
        "--bands",
        "B2,B3,B4,B8",
        "--init",
        TINY,
        "--init-weights",
        str(weights),
        "--crop-size",
        "56",
        "--local-crops",
        "2",
        "--dry-run",
        "--json",
        *args,
    )
    assert code == 0, stderr
    return json.loads(stdout), stderr


def test_cli_preset_with_explicit_overrides_and_the_warning_in_the_plan(tmp_path, tiny_weights):
    plan, stderr = _dry_run(
        tmp_path, tiny_weights, "--preset", "paper", "--batch-size", "4", "--head-prototypes", "64"
    )
    assert plan["preset"] == "paper" and plan["global_batch"] == 1024
    assert plan["accumulate"] == 256 and plan["batch_size_per_device"] == 4
    assert plan["steps"] == 150_000 and plan["lr"] == pytest.approx(1e-3)
    assert len(plan["warnings"]) == 1 and "over 4 image(s)" in plan["warnings"][0]
    assert stderr.count("Sinkhorn-Knopp balances") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_global_batch_that_does_not_divide(tmp_path, tiny_weights):
    code, stdout, stderr = run_cli(
        "adapt",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(tmp_path / "x.pt"),
        "--init",
        TINY,
        "--init-weights",
        str(tiny_weights),
        "--batch-size",
        "3",
        "--global-batch",
        "100",
        "--dry-run",
    )
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("geoexplora: error: --global-batch: 100 ")
    assert list(tmp_path.iterdir()) == []


class _LinearObjective(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(10, 20)

    def forward(self, batch, step):
        return {"loss": self.linear(batch["image"]).sum()}


def test_step_flops_counts_forward_and_backward_per_image():
    data = [{"image": torch.ones(10)} for _ in range(3)]
    objective = _LinearObjective()
    flops = A.step_flops(objective, data, micro_batch=3)
    # forward 2*10*20 per image, backward the same for the weight gradient (the input needs none)
    assert flops["per_image"] == 2 * 2 * 10 * 20
    assert flops["by_op"] == {"addmm": 400.0, "mm": 400.0}
    assert objective.linear.weight.grad is None  # gradients dropped


def test_budget_arithmetic_against_the_published_run():
    b = A.budget(1e12, steps=3000, global_batch=256)
    assert b["images_seen"] == 768_000 and b["published_images_seen"] == 153_600_000
    assert b["fraction_of_published"] == pytest.approx(0.005)
    assert b["flops_per_step"] == 256e12
    rate = SCALE.gpu_peak_flops * SCALE.mfu
    assert b["gpu_hours"] == pytest.approx(768_000e12 / rate / 3600)
    assert b["images_per_s"] == pytest.approx(rate / 1e12)


def test_cli_dry_run_prints_the_budget_of_the_tiny_model(tmp_path, tiny_weights):
    plan, _ = _dry_run(
        tmp_path, tiny_weights, "--steps", "100", "--batch-size", "4", "--global-batch", "8"
    )
    b = plan["budget"]
    assert b["images_seen"] == 800 and plan["accumulate"] == 2
    assert b["flops_per_step"] == pytest.approx(8 * b["flops_per_image"])
    assert b["total_flops"] == pytest.approx(100 * b["flops_per_step"])
    assert sum(b["flops_per_image_by_op"].values()) == pytest.approx(b["flops_per_image"])
    # the tiny ViT (dim 64, depth 4, MLP x4): each block's linear layers cost 2 * 12 * D^2 per
    # token; teacher and student both run the 2 global crops of 16 patches + 1 class token,
    # the student also 2 local crops of 98 px (49 + 1 tokens) and a backward pass (at least as
    # much again); the heads and attention add less than as much again
    per_token = 4 * 2 * 12 * 64**2
    forward = per_token * (2 * 17 + 2 * 17 + 2 * 50)
    assert 1.9 * forward < b["flops_per_image"] < 5 * forward
    assert "memory_per_device" in plan
    code, stdout, _ = run_cli(
        "adapt",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(tmp_path / "plan.pt"),
        "--bands",
        "B2,B3,B4,B8",
        "--init",
        TINY,
        "--init-weights",
        str(tiny_weights),
        "--crop-size",
        "56",
        "--local-crops",
        "2",
        "--dry-run",
        "--steps",
        "100",
    )
    assert code == 0 and "GPU-hours" in stdout and "images seen" in stdout
