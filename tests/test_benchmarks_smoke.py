"""Smoke runs of the benchmarks this suite owns: ``domain_shift.py --smoke`` (2 steps per arm,
real data), ``gpu.sh --dry-run`` (the GPU check's code on CPU with tiny configurations) and
``tile.py`` on the bundled Sentinel-2 crop.
They check that the scripts run and print complete JSON lines with sane numbers; the numbers
themselves are in docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA

ARMS = ["source", "explora", "lora_only", "full", "scratch", "random"]


def _run(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "GEOEXPLORA_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _numbers(doc) -> list[float]:
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in _numbers(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _numbers(v)]
    return [float(doc)] if isinstance(doc, (int, float)) and not isinstance(doc, bool) else []


@pytest.fixture(scope="module")
def domain_shift(shared_data, tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("domain_shift")
    return _run(
        [
            sys.executable,
            "-W",
            "ignore",
            "benchmarks/domain_shift.py",
            "--smoke",
            "--work",
            str(work),
        ]
    )


def _what(lines: list[dict], what: str) -> list[dict]:
    return [d for d in lines if d.get("what") == what]


def test_domain_shift_prints_one_line_per_arm_and_a_summary_each(domain_shift):
    assert [d["arm"] for d in _what(domain_shift, "arm")] == ARMS
    assert [d["arm"] for d in _what(domain_shift, "summary")] == ARMS
    assert len(_what(domain_shift, "source")) == len(_what(domain_shift, "verdict")) == 1


def test_domain_shift_numbers_are_finite_and_accuracies_are_fractions(domain_shift):
    assert all(math.isfinite(x) for d in domain_shift for x in _numbers(d))
    for row in _what(domain_shift, "arm"):
        for key in ("top1", "balanced_accuracy", "knn_top1"):
            assert 0.0 <= row[key] <= 1.0, (row["arm"], key, row[key])
        assert row["evaluated_on"] == "test" and row["test_chips"] > 0


def test_domain_shift_adapted_arms_ran_the_smoke_budget(domain_shift):
    rows = {d["arm"]: d for d in _what(domain_shift, "arm")}
    assert {
        a: rows[a]["steps"] for a in ("explora", "lora_only", "full", "scratch")
    } == dict.fromkeys(("explora", "lora_only", "full", "scratch"), 2)
    assert _what(domain_shift, "source")[0]["steps"] == 2


def test_domain_shift_trainable_parameters_order_the_arms(domain_shift):
    rows = {d["arm"]: d for d in _what(domain_shift, "arm")}
    total = rows["full"]["total_params"]
    assert rows["full"]["trainable_params"] == rows["scratch"]["trainable_params"] == total
    assert 0 < rows["lora_only"]["trainable_params"] < rows["explora"]["trainable_params"] < total
    assert rows["source"]["trainable_params"] == rows["random"]["trainable_params"] == 0
    assert rows["explora"]["trainable_groups"]["unfrozen_blocks"] > 0
    assert rows["lora_only"]["trainable_groups"]["unfrozen_blocks"] == 0


def test_domain_shift_verdict_states_each_criterion(domain_shift):
    verdict = _what(domain_shift, "verdict")[0]
    for key in ("top1", "knn_top1"):
        assert set(verdict[key]) >= {
            "explora_minus_source",
            "full_minus_explora",
            "lifted",
            "close_to_full",
        }
    assert verdict["fewer_parameters"] is True
    assert isinstance(verdict["claim_held"], bool)


@pytest.fixture(scope="module")
def gpu_dry_run() -> list[dict]:
    return _run(["bash", "benchmarks/gpu.sh", "--dry-run"])


def test_gpu_dry_run_measures_every_part(gpu_dry_run):
    kinds = [d["benchmark"] for d in gpu_dry_run]
    assert kinds == [
        "gpu_peak",
        "gpu_adapt_step",
        "gpu_adapt_step",
        "gpu_adapt_step",
        "gpu_adapt_end_to_end",
        "gpu_adapt_diagnostics",
        "gpu_predict",
        "gpu_ddp",
    ]
    assert all(math.isfinite(x) for d in gpu_dry_run for x in _numbers(d))
    assert gpu_dry_run[-1]["skipped"].startswith("0 GPU")


def test_gpu_dry_run_explora_trains_and_computes_less_than_full(gpu_dry_run):
    explora, full = [
        d
        for d in gpu_dry_run
        if d["benchmark"] == "gpu_adapt_step" and d["micro_batch"] == "throughput"
    ]
    assert (explora["mode"], full["mode"]) == ("explora", "full")
    assert explora["trainable_params"] < full["trainable_params"] == full["total_params"]
    # Frozen weights need no weight gradients: fewer FLOPs per image.
    assert explora["gflops_per_image"] < full["gflops_per_image"]
    assert explora["images_per_s"] > 0 and full["images_per_s"] > 0


def test_gpu_dry_run_times_the_paper_micro_batch(gpu_dry_run):
    (paper,) = [d for d in gpu_dry_run if d.get("micro_batch") == "paper"]
    assert paper["mode"] == "explora" and paper["batch_size"] == 2  # the dry run's "8"
    assert paper["images_per_s"] > 0 and paper["gflops_per_image"] > 0


def test_gpu_dry_run_reports_the_learning_diagnostics_of_a_real_multi_scene_run(gpu_dry_run):
    (diag,) = [d for d in gpu_dry_run if d["benchmark"] == "gpu_adapt_diagnostics"]
    assert len(diag["target"]) == 5 and diag["steps"] == 4 and diag["window"] == 100
    for part in ("first", "last"):
        values = diag[part]
        for key in (
            "loss_dino",
            "teacher_entropy",
            "student_entropy",
            "kl_dino",
            "view_agreement",
            "prototype_max_mass",
            "grad_norm_lora",
            "grad_norm_head",
        ):
            assert math.isfinite(values[key]), (part, key)
        assert values["kl_dino"] == pytest.approx(
            values["loss_dino"] - values["teacher_entropy"], rel=1e-2
        )
        assert 0 <= values["view_agreement"] <= 1
        assert values["student_entropy"] <= values["uniform_entropy"] + 1e-6
    assert diag["stalled"] is None  # 4 steps: too early for the rule
    assert any("Sinkhorn-Knopp" in w for w in diag["warnings"])  # 4 images per step


def test_tile_benchmark_prints_rates_and_ratios_against_both_baselines(tmp_path):
    from geoexplora import sample

    lines = _run(
        [
            sys.executable,
            "-W",
            "ignore",
            "benchmarks/tile.py",
            "--scene",
            str(sample.s2_tile_crop()),
            "--size",
            "64",
            "--repeat",
            "1",
        ]
    )
    rates = {d["what"]: d for d in lines if d["what"] != "ratios"}
    assert set(rates) == {"raw_read", "raw_read_threads", "naive", "tile_1", "tile_2"}
    assert rates["naive"]["chips"] == 16 and rates["tile_1"]["chips"] == 16  # 256 px / 64 px
    assert all(d["seconds"] > 0 and d["mb_per_s"] > 0 for d in rates.values())
    (ratios,) = [d for d in lines if d["what"] == "ratios"]
    tiled = rates[ratios["best_tile"]]
    assert ratios["tile_vs_naive"] == pytest.approx(
        tiled["mb_per_s"] / rates["naive"]["mb_per_s"], rel=0.02
    )
    assert ratios["targets"] == {"tile_vs_naive": 3.0, "tile_vs_raw_read": 0.5}
