"""``adapt``: ExPLoRA extended pre-training end to end, on the bundled real Sentinel-2 sample
(Slovenia, 2015) with a tiny DINOv2-shaped ViT initialised from a locally written checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import TINY, timm_model

from geoexplora import sample
from geoexplora.errors import UserError
from geoexplora.pipelines import adapt as A
from geoexplora.train.engine import Interrupted, RunFiles, read_log

BANDS = ["B2", "B3", "B4", "B8"]
STEPS = 6


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A timm-layout checkpoint of the tiny DINOv2-shaped ViT, with non-trivial weights."""
    path = tmp_path_factory.mktemp("weights") / "tiny_dinov2.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), path)
    return path


def adapt_report(cfg: A.AdaptConfig) -> dict:
    """The result document of an adapt run (what --json prints)."""
    return A.adapt(cfg).report


def config(out: Path, weights: Path, **kw) -> A.AdaptConfig:
    base = {
        "inputs": sample.slovenia_scenes()[:2],
        "output": out,
        "bands": BANDS,
        "init": TINY,
        "init_weights": str(weights),
        "steps": STEPS,
        "batch_size": 4,
        "crop_size": 56,
        "local_crop_size": 28,
        "local_crops": 2,
        "lr": 1e-3,
        "num_workers": 0,
        "checkpoint_every": 100,
    }
    return A.AdaptConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_weights):
    """One uninterrupted run, shared by the tests that inspect its results."""
    out = tmp_path_factory.mktemp("run") / "adapted.pt"
    summary = adapt_report(config(out, tiny_weights))
    return out, summary


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> Path:
    """A real unlabeled chips dataset (Sentinel-2 L2A, 12 bands), 56 px chips."""
    from factories import make_chips_dataset

    return make_chips_dataset(tmp_path_factory.mktemp("chips"), "unlabeled", size=56)


def initial_backbone(weights: Path, summary: dict):
    """The model adapt started from (same bands and statistics), before ExPLoRA."""
    from geoexplora.models import build_backbone

    stats = A.load_data(config(Path("unused.pt"), weights), 56).stats
    return build_backbone(
        init=TINY,
        init_weights=str(weights),
        bands=[f"sentinel2:{b}" for b in BANDS],
        stats=stats,
        img_size=56,
    )


def test_losses_are_finite_and_the_total_decreases(run):
    out, summary = run
    records = read_log(RunFiles(out).log)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("loss", "loss_dino", "loss_ibot", "loss_koleo"):
            assert torch.isfinite(torch.tensor(r[key])), (r["step"], key)
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.1
    assert summary["first_loss"] == records[0]["loss"]
    assert summary["last_loss"] == records[-1]["loss"]


def test_run_writes_the_model_log_plot_and_checkpoint_next_to_the_output(run):
    out, summary = run
    files = RunFiles(out)
    assert out.is_file() and files.checkpoint.is_file()
    assert files.plot.read_bytes()[:4] == b"\x89PNG"
    assert summary["objective"] == "dinov2"
    assert 0.0 <= summary["data_wait_fraction"] < 1.0
    assert summary["images_per_s"] > 0
    assert not list(out.parent.glob(".*partial"))


def test_only_the_explora_parameters_change(run, tiny_weights):
    from geoexplora.models.file import load_model

    out, summary = run
    before = initial_backbone(tiny_weights, summary).state_dict()
    after = load_model(out).state_dict()
    assert set(before) == set(after)
    dim = before["vit.cls_token"].shape[-1]
    unchanged = [
        "vit.pos_embed",
        "mask_token",
        "vit.blocks.0.mlp.fc1.weight",
        "vit.blocks.2.attn.proj.weight",
        "vit.blocks.1.ls1.gamma",
    ]
    for name in unchanged:
        assert torch.equal(before[name], after[name]), name
    for block in range(3):  # LoRA blocks: K (middle third of qkv) untouched, Q and V updated
        name = f"vit.blocks.{block}.attn.qkv.weight"
        assert torch.equal(before[name][dim : 2 * dim], after[name][dim : 2 * dim]), name
        assert not torch.equal(before[name][:dim], after[name][:dim]), name
        assert not torch.equal(before[name][2 * dim :], after[name][2 * dim :]), name
    changed = [
        "vit.cls_token",
        "vit.blocks.3.mlp.fc1.weight",
        "vit.blocks.3.attn.proj.weight",
        "vit.blocks.0.norm1.weight",
        "vit.norm.weight",
        "vit.patch_embed.proj.banks.0.kernels",
    ]  # new bands: the embedding trains
    for name in changed:
        assert not torch.equal(before[name], after[name]), name
    report = summary["parameters"]
    assert report["unfrozen_block_indices"] == [3]
    assert report["trainable"] < report["total"]


def test_exported_model_is_the_merged_ema_teacher(run, tiny_weights):
    """The model file equals the checkpoint's teacher with its LoRA folded in."""
    from geoexplora.models.file import load_model
    from geoexplora.ssl.dinov2 import DinoV2Objective

    out, _ = run
    cfg = config(out, tiny_weights)
    data = A.load_data(cfg, cfg.crop_size)
    backbone, _ = A.build_model(
        cfg, "dinov2", A.objective_settings("dinov2", {}), data.bands, data.stats, 1
    )
    objective = A.make_objective(cfg, "dinov2", A.objective_settings("dinov2", {}), backbone, STEPS)
    assert isinstance(objective, DinoV2Objective)
    state = torch.load(RunFiles(out).checkpoint, weights_only=True)
    objective.load_state_dict(state["module"])
    teacher = objective.teacher["backbone"].eval()
    exported = load_model(out)
    x = torch.from_numpy(sample_window()).unsqueeze(0)
    with torch.no_grad():
        want = teacher.forward_features(x)
        got = exported.forward_features(x)
    torch.testing.assert_close(got["cls"], want["cls"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["patch"], want["patch"], atol=1e-5, rtol=1e-4)
    assert exported.meta["training"]["objective"] == "dinov2"
    assert exported.meta["backbone"]["stats"]["origin"] == "data"
    assert [b["name"] for b in exported.meta["backbone"]["bands"]] == BANDS


def sample_window():
    from rasterio.windows import Window

    from geoexplora.io.scene import SceneOptions, open_scene

    scene = open_scene(sample.slovenia_scenes()[:1], SceneOptions(bands=BANDS))
    return scene.read(Window(10, 10, 56, 56))


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(
    run, tiny_weights, tmp_path, monkeypatch
):
    from geoexplora.models.file import load_model
    from geoexplora.ssl.dinov2 import DinoV2Objective

    out = tmp_path / "adapted.pt"
    original = DinoV2Objective.after_optimizer_step

    def interrupt_after_step_3(self, step):
        original(self, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(DinoV2Objective, "after_optimizer_step", interrupt_after_step_3)
    with pytest.raises(Interrupted, match=f"step 3/{STEPS}"):
        adapt_report(config(out, tiny_weights))
    assert not out.exists()
    monkeypatch.setattr(DinoV2Objective, "after_optimizer_step", original)
    summary = adapt_report(config(out, tiny_weights, resume=True))
    assert summary["resumed_from_step"] == 3
    assert summary["first_loss"] == run[1]["first_loss"]  # step 1's, not the resumed step's
    reference = load_model(run[0]).state_dict()
    resumed = load_model(out).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    assert [r["step"] for r in read_log(RunFiles(out).log)] == list(range(1, STEPS + 1))


def test_resume_with_other_options_is_refused(run, tiny_weights, tmp_path):
    out = tmp_path / "adapted.pt"
    shutil.copy(RunFiles(run[0]).checkpoint, RunFiles(out).checkpoint)
    with pytest.raises(UserError, match=r"different run.*lora_rank"):
        adapt_report(config(out, tiny_weights, resume=True, lora_rank=4))
    assert not out.exists()


def test_mae_source_keeps_and_lora_tunes_its_decoder(tmp_path):
    from factories import TINY_MAE

    from geoexplora.ssl.mae import MaeDecoder

    encoder = timm_model(TINY_MAE, img_size=32).state_dict()
    decoder = MaeDecoder(64, 32, 1, 1, 16 * 16 * 3, (2, 2)).state_dict()
    weights = tmp_path / "mae.pth"
    torch.save({"model": {**encoder, **decoder}}, weights)
    out = tmp_path / "mae_adapted.pt"
    summary = adapt_report(config(out, weights, init=TINY_MAE, crop_size=32, steps=4, lr=3e-3))
    assert summary["objective"] == "mae"
    assert summary["mae_decoder"] == "source_lora"
    records = read_log(RunFiles(out).log)
    assert all(torch.isfinite(torch.tensor(r["loss_mae"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_chips_dataset_input_uses_its_statistics(tmp_path, tiny_weights, chips):
    from geoexplora.models.file import load_model

    root = chips
    out = tmp_path / "from_chips.pt"
    summary = adapt_report(config(out, tiny_weights, inputs=[root], steps=2, batch_size=2))
    meta = json.loads((root / "dataset.json").read_text())
    keys = [b["key"] for b in meta["bands"]]
    want = [meta["stats"]["mean"][keys.index(f"sentinel2:{b}")] for b in BANDS]
    assert summary["data"]["kind"] == "chips"
    assert load_model(out).meta["backbone"]["stats"]["mean"] == pytest.approx(want)


def test_temporal_scenes_adapt_with_the_date_encoding(tmp_path, tiny_weights):
    from geoexplora.models.file import load_model

    out = tmp_path / "temporal.pt"
    summary = adapt_report(
        config(
            out,
            tiny_weights,
            inputs=sample.slovenia_scenes()[:2],
            frames=2,
            steps=2,
            batch_size=2,
            local_crops=0,
        )
    )
    assert summary["frames"] == 2
    assert summary["parameters"]["groups"]["embedding"] > 0
    model = load_model(out)
    assert model.num_frames == 2
    assert model.date_encoding.gate.abs().sum() > 0  # zero at initialisation: it trained


def test_dry_run_reports_the_plan_and_writes_nothing(tmp_path, tiny_weights):
    out = tmp_path / "planned.pt"
    code, stdout, stderr = run_cli(
        "adapt",
        *map(str, sample.slovenia_scenes()[:1]),
        "-o",
        str(out),
        "--bands",
        "B2,B3,B4,B8",
        "--init",
        TINY,
        "--init-weights",
        str(tiny_weights),
        "--crop-size",
        "56",
        "--batch-size",
        "4",
        "--accumulate",
        "2",
        "--devices",
        "1",
        "--dry-run",
        "--json",
    )
    assert code == 0, stderr
    plan = json.loads(stdout)
    assert plan["steps"] == 1000 and plan["global_batch"] == 8
    assert plan["parameters"]["unfrozen_block_indices"] == [3]
    memory = plan["memory_per_device"]
    assert memory["total"] == sum(
        memory[k] for k in ("weights", "gradients", "optimizer_state", "activations")
    )
    assert memory["optimizer_state"] == 2 * memory["gradients"]
    assert list(tmp_path.iterdir()) == []


def test_cli_json_summary(tmp_path, tiny_weights):
    out = tmp_path / "cli.pt"
    code, stdout, stderr = run_cli(
        "adapt",
        "--bands",
        "B2,B3,B4,B8",
        *map(str, sample.slovenia_scenes()[:1]),
        "-o",
        str(out),
        "--init",
        TINY,
        "--init-weights",
        str(tiny_weights),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--local-crop-size",
        "28",
        "--local-crops",
        "1",
        "--num-workers",
        "0",
        "--lora-rank",
        "4",
        "--unfreeze-blocks",
        "0,-1",
        "--json",
    )
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["steps"] == 2 and doc["output"] == str(out)
    assert doc["parameters"]["unfrozen_block_indices"] == [0, 3]
    assert doc["first_loss"] > 0 and doc["last_loss"] > 0
    assert out.is_file()


# --- bad input ---------------------------------------------------------------------------------


def _cli(tmp_path, weights, *args, inputs=None):
    inputs = inputs or [str(sample.slovenia_scenes()[0])]
    return run_cli(
        "adapt",
        *inputs,
        "--init",
        TINY,
        "--init-weights",
        str(weights),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--num-workers",
        "0",
        *args,
    )


def test_scene_without_valid_pixels_is_refused(tmp_path, tiny_weights):
    import numpy as np
    import rasterio

    src = sample.slovenia_scenes()[0]
    empty = tmp_path / "S2L1C_2015-07-11_empty.tif"
    with rasterio.open(src) as ds:
        profile = ds.profile
        descriptions = ds.descriptions
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(
            np.full(
                (profile["count"], profile["height"], profile["width"]),
                np.nan,
                dtype=profile["dtype"],
            )
        )
        dst.descriptions = descriptions
    code, _, stderr = _cli(
        tmp_path,
        tiny_weights,
        "-o",
        str(tmp_path / "m.pt"),
        "--bands",
        "B2,B3,B4,B8",
        inputs=[str(empty)],
    )
    assert code == 2
    assert "no valid pixels" in stderr and empty.name in stderr
    assert not (tmp_path / "m.pt").exists()


def test_missing_band_is_refused(tmp_path, tiny_weights):
    code, _, stderr = _cli(
        tmp_path, tiny_weights, "-o", str(tmp_path / "m.pt"), "--bands", "B2,B3,B4,B13"
    )
    assert code == 2 and stderr.startswith("geoexplora: error:") and "B13" in stderr
    assert not (tmp_path / "m.pt").exists()


def test_band_missing_from_a_chips_dataset_is_refused(tmp_path, tiny_weights, chips):
    root = chips
    with pytest.raises(UserError, match="B10: not in the chips dataset"):
        adapt_report(config(tmp_path / "m.pt", tiny_weights, inputs=[root], bands=["B2", "B10"]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_is_refused(tmp_path, tiny_weights):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, stderr = _cli(
        tmp_path, tiny_weights, "-o", str(locked / "m.pt"), "--bands", "B2,B3,B4,B8"
    )
    assert code == 2 and "not writable" in stderr


def test_output_in_a_file_instead_of_a_folder_is_refused(tmp_path, tiny_weights):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = _cli(
        tmp_path, tiny_weights, "-o", str(blocker / "m.pt"), "--bands", "B2,B3,B4,B8"
    )
    assert code == 2 and "is not a folder" in stderr


def test_existing_output_needs_overwrite(tmp_path, tiny_weights):
    out = tmp_path / "m.pt"
    out.write_text("keep me")
    code, _, stderr = _cli(tmp_path, tiny_weights, "-o", str(out), "--bands", "B2,B3,B4,B8")
    assert code == 2 and "--overwrite" in stderr
    assert out.read_text() == "keep me"


def test_batch_larger_than_the_chips_dataset_is_refused(tmp_path, tiny_weights, chips):
    root = chips
    code, _, stderr = run_cli(
        "adapt",
        str(root),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        str(tiny_weights),
        "--batch-size",
        "500",
        "--crop-size",
        "56",
        "--bands",
        "B2,B3,B4,B8",
    )
    assert code == 2 and "larger than the chips dataset" in stderr
    assert not (tmp_path / "m.pt").exists()


def test_scene_smaller_than_the_window_is_refused(tmp_path, tiny_weights):
    code, _, stderr = _cli(
        tmp_path,
        tiny_weights,
        "-o",
        str(tmp_path / "m.pt"),
        "--bands",
        "B2,B3,B4,B8",
        "--crop-size",
        "224",
    )
    assert code == 2 and "smaller than the 224 px training window" in stderr


def test_arch_option_overrides_the_architecture(tmp_path):
    from conftest import run_cli

    from geoexplora.sample import s2_tile_crop

    code, out, err = run_cli(
        "adapt",
        str(s2_tile_crop()),
        "--bands",
        "B2,B3,B4",
        "--init",
        "geo_vit_tiny_patch14",
        "--init-weights",
        "random",
        "--arch",
        "depth=2",
        "--arch",
        "init_values=1.0",
        "--dry-run",
        "--json",
        "-o",
        str(tmp_path / "a.pt"),
    )
    assert code == 0, err
    assert json.loads(out)["parameters"]["unfrozen_block_indices"] == [1]  # the last of 2
    assert not (tmp_path / "a.pt").exists()
    code, _, err = run_cli(
        "adapt", str(s2_tile_crop()), "--arch", "depth", "-o", str(tmp_path / "b.pt")
    )
    assert code == 2 and "--arch 'depth' is not KEY=VALUE" in err


def test_adapt_closes_the_scenes_it_opens(tmp_path, tiny_weights, monkeypatch):
    from geoexplora.io.scene import Scene

    closed: list = []
    original = Scene.close
    monkeypatch.setattr(Scene, "close", lambda self: (closed.append(self), original(self)))
    adapt_report(config(tmp_path / "a.pt", tiny_weights, steps=1))
    assert len(closed) >= 2  # both scenes (as the single-date scenes the sampler reads)
    closed.clear()
    adapt_report(config(tmp_path / "b.pt", tiny_weights, steps=1, dry_run=True))
    assert len(closed) >= 2  # a dry run too
