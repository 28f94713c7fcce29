"""GPU benchmark (run by ``benchmarks/gpu.sh``): one JSON line per measurement.

* ``gpu_peak``: the bf16 (fp32 on CPU) matrix-product rate measured now, the ceiling the
  model-FLOP utilisation is also given against (besides the spec: ``--peak-tflops``).
* ``gpu_adapt_step``: for ViT-B/14 and ViT-L/14 (random weights: throughput does not depend on
  them), ExPLoRA vs full-parameter, the DINOv2 objective (2 global 224 px + 8 local 98 px
  crops, iBOT masks, EMA teacher) built exactly as ``adapt`` builds it, bf16-mixed through
  Fabric: images/s of the optimiser step on a batch already on the device, peak memory, model
  FLOPs per image (counted by ``torch.utils.flop_counter`` over one step: what this
  configuration executes, so ExPLoRA's frozen weights cost no weight gradients) and model-FLOP
  utilisation = FLOPs per step / seconds per step / peak. Target ViT-L/14 ExPLoRA >= 35 %.
  Each model also at ``--preset paper``'s micro-batch (8 images per GPU: what the published run
  executes per step, ``"micro_batch": "paper"``); both with the run's separate backbone/head
  clips.
* ``gpu_adapt_diagnostics``: ``adapt()`` for the first few hundred steps of a ViT-B/14 on a real
  multi-scene target (``--target``; default the Sentinel-2 L2A scenes of ``.bench-data/`` or of
  ``$GEOEXPLORA_SHARED_DATA``, plus the bundled crop): the learning diagnostics of its log (loss
  terms, teacher/student entropy, ``kl_dino``, view agreement, prototype mass, per-group
  gradient norms) averaged over its first and last tenth, the stall rule's verdict and the
  run's warnings. Random weights (no network there) with LayerScale 1.0, so the numbers say
  whether the objective learns from scratch on this data, not what a DINOv2 source does.
* ``gpu_adapt_end_to_end``: ``adapt()`` itself on a synthetic Sentinel-2 scene (data loading,
  crops, logging, checkpoint): steady-state images/s from its log vs the step alone.
* ``gpu_predict``: ``predict()`` of a ViT-B/14 segmentation model over a synthetic scene,
  megapixels/s.
* ``gpu_ddp``: with more than one GPU, a 2-step ``adapt --devices N`` (the CLI, which re-runs
  itself once per device) must finish with identical replicas.

``--dry-run``: the same code on CPU with the tiny registry model, small crops and sizes (a
check that the script runs; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet (KINDS.md measured ~790)


@dataclass(frozen=True)
class Profile:
    models: tuple[str, ...]
    accelerator: str
    precision: str
    crop: int
    local_crop: int
    local_crops: int
    batch_size: dict  # model -> images per step
    warmup_steps: int
    timed_steps: int
    end_to_end_steps: int
    scene_size: int  # synthetic adapt scene, pixels a side
    predict_size: int  # synthetic predict scene, pixels a side
    predict_batch: int
    matmul_size: int
    lora_rank: int  # the recipe's 64 (for width 1024); the tiny dry-run model is 64 wide
    paper_batch: int  # --preset paper's micro-batch (8 per GPU)
    diag_model: str
    diag_batch: int  # what Sinkhorn-Knopp balances per step (the published run's 8 x 4 GPUs)
    diag_steps: int
    diag_bands: str


GPU = Profile(
    models=("vit_base_patch14_dinov2", "vit_large_patch14_dinov2"),
    accelerator="gpu",
    precision="bf16-mixed",
    crop=224,
    local_crop=98,
    local_crops=8,
    batch_size={"vit_base_patch14_dinov2": 64, "vit_large_patch14_dinov2": 32},
    warmup_steps=3,
    timed_steps=10,
    end_to_end_steps=40,
    scene_size=2048,
    predict_size=4096,
    predict_batch=64,
    matmul_size=8192,
    lora_rank=64,
    paper_batch=8,
    diag_model="vit_base_patch14_dinov2",
    diag_batch=32,
    diag_steps=300,
    diag_bands="B4,B3,B2",
)
DRY = Profile(
    models=("geo_vit_tiny_patch14",),
    accelerator="cpu",
    precision="32-true",
    crop=56,
    local_crop=28,
    local_crops=2,
    batch_size={"geo_vit_tiny_patch14": 4},
    warmup_steps=1,
    timed_steps=2,
    end_to_end_steps=3,
    scene_size=256,
    predict_size=256,
    predict_batch=8,
    matmul_size=512,
    lora_rank=4,
    paper_batch=2,
    diag_model="geo_vit_tiny_patch14",
    diag_batch=4,
    diag_steps=4,
    diag_bands="B4,B3,B2",
)


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (CPU dry runs give tiny numbers)."""
    return float(f"{x:.{digits}g}")


def device_of(profile: Profile):
    import torch

    return torch.device("cuda" if profile.accelerator == "gpu" else "cpu")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_tflops(profile: Profile) -> float:
    """Mean rate of ten square matrix products after three warm-ups (bf16 on GPU)."""
    import torch

    device = device_of(profile)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = profile.matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def release_memory() -> None:
    """Free the previous measurement's model before the next one (Fabric holds cycles)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_scene(path: Path, size: int, seed: int = 0) -> Path:
    """A Sentinel-2 L2A-like 4-band (B2, B3, B4, B8) uint16 scene, smooth random fields plus
    noise (the content does not matter for speed), EPSG:32633, 10 m, 2020-06-01."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(300, 4000, size=(4, size // 64 + 1, size // 64 + 1))
    field = np.repeat(np.repeat(coarse, 64, axis=1), 64, axis=2)[:, :size, :size]
    data = (field + rng.normal(0, 100, field.shape)).clip(1, 10000).astype("uint16")
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 4,
        "dtype": "uint16",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000, 5_000_000, 10, 10),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = ("B02", "B03", "B04", "B08")
        dst.update_tags(ACQUISITION_DATE="2020-06-01")
    return path


def adapt_config(
    profile: Profile,
    model: str,
    mode: str,
    scene: Path,
    output: Path,
    steps: int,
    num_workers: int | None,
    batch_size: int | None = None,
):
    from geoexplora.pipelines.adapt import AdaptConfig

    return AdaptConfig(
        inputs=[scene],
        output=output,
        sensor="sentinel2",
        init=model,
        init_weights="random",
        full=mode == "full",
        steps=steps,
        batch_size=batch_size or profile.batch_size[model],
        crop_size=profile.crop,
        local_crop_size=profile.local_crop,
        local_crops=profile.local_crops,
        lora_rank=profile.lora_rank,
        accelerator=profile.accelerator,
        precision=profile.precision,
        num_workers=num_workers,
        overwrite=True,
        checkpoint_every=10**9,
    )


def adapt_step(
    profile: Profile,
    model: str,
    mode: str,
    scene: Path,
    work: Path,
    peaks: dict,
    batch_size: int | None = None,
) -> dict:
    """The optimiser step of ``adapt``, timed on one batch kept on the device."""
    import torch
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    from geoexplora.pipelines import adapt as A
    from geoexplora.train import engine as E

    steps = profile.warmup_steps + profile.timed_steps + 1
    cfg = A.resolve_scale(
        adapt_config(profile, model, mode, scene, work / "step.pt", steps, 0, batch_size), world=1
    )
    objective = A.choose_objective(cfg)
    settings = A.objective_settings(objective, {})
    fabric = E.make_fabric(E.FabricSettings(cfg.accelerator, 1, 1, "auto", cfg.precision))
    torch.manual_seed(0)
    data = A.load_data(cfg, cfg.crop_size, context=cfg.context_factor)
    backbone, report = A.build_model(cfg, objective, settings, data.bands, data.stats, data.frames)
    data.dataset.prepare = A.make_prepare(
        cfg, objective, settings, backbone.patch_size, backbone.num_groups, data.frames
    )
    module = A.make_objective(cfg, objective, settings, backbone, steps, data.bands)
    optimizer = E.build_optimizer(
        A.optimizer_groups(module, objective, settings, backbone.depth), betas=settings.betas
    )
    clips = module.clip_groups() or {"all": [p for p in module.parameters() if p.requires_grad]}
    wrapped, optimizer = fabric.setup(module, optimizer)
    batch = fabric.to_device(default_collate([data.dataset[i] for i in range(cfg.batch_size)]))
    device = fabric.device

    def step(i: int) -> None:
        out = wrapped(batch, i)
        fabric.backward(out["loss"])
        for params in clips.values():  # as the engine: backbone and head clipped separately
            torch.nn.utils.clip_grad_norm_(params, settings.clip_grad, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.after_optimizer_step(i)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(profile.warmup_steps):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(profile.warmup_steps, profile.warmup_steps + profile.timed_steps):
        step(i)
    sync(device)
    seconds = (time.perf_counter() - start) / profile.timed_steps
    counter = FlopCounterMode(display=False)
    with counter:
        step(steps - 1)
    flops = counter.get_total_flops()
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    doc = {
        "benchmark": "gpu_adapt_step",
        "model": model,
        "mode": mode,
        "micro_batch": "paper" if batch_size == profile.paper_batch else "throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "crops": {"global": [2, cfg.crop_size], "local": [cfg.local_crops, cfg.local_crop_size]},
        "trainable_params": report["trainable"],
        "total_params": report["total"],
        "step_s": round(seconds, 4),
        "images_per_s": round(cfg.batch_size / seconds, 1),
        "peak_memory_gib": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
        "gflops_per_image": sig(flops / cfg.batch_size / 1e9),
        "achieved_tflops": sig(flops / seconds / 1e12),
    }
    for name, peak in peaks.items():
        if peak:
            doc[f"mfu_vs_{name}"] = sig(flops / seconds / 1e12 / peak)
    if model.startswith("vit_large") and mode == "explora":
        doc["target_mfu_vs_spec"] = 0.35
    return doc


def adapt_end_to_end(
    profile: Profile, model: str, scene: Path, work: Path, step_images_per_s: float
) -> dict:
    """``adapt()`` itself (ExPLoRA); steady state = median images/s of its log's second half."""

    from geoexplora.pipelines.adapt import adapt
    from geoexplora.train.engine import RunFiles, read_log

    output = work / f"{model}-explora.pt"
    start = time.perf_counter()
    summary = adapt(
        adapt_config(profile, model, "explora", scene, output, profile.end_to_end_steps, None)
    ).report
    wall = time.perf_counter() - start
    records = read_log(RunFiles(output).log)
    steady = statistics.median(r["images_per_s"] for r in records[len(records) // 2 :])
    peak = summary["peak_memory_bytes"]
    release_memory()
    doc = {
        "benchmark": "gpu_adapt_end_to_end",
        "model": model,
        "mode": "explora",
        "steps": summary["steps"],
        "global_batch": summary["global_batch"],
        "wall_s": round(wall, 1),
        "images_per_s_whole_run": round(summary["images_per_s"], 1),
        "images_per_s_steady": round(steady, 1),
        "data_wait_fraction": round(summary["data_wait_fraction"], 3),
        "peak_memory_gib": round(peak / 2**30, 2) if peak else None,
        "ratio_steady_to_step_alone": round(steady / step_images_per_s, 3),
    }
    return doc


DIAGNOSTICS = (
    "loss",
    "loss_dino",
    "loss_ibot",
    "loss_koleo",
    "teacher_entropy",
    "student_entropy",
    "uniform_entropy",
    "kl_dino",
    "view_agreement",
    "prototype_max_mass",
    "grad_norm",
    "grad_norm_lora",
    "grad_norm_blocks",
    "grad_norm_norms_embedding",
    "grad_norm_head",
    "lr",
    "images_per_s",
)


def default_target(profile: Profile) -> list[Path]:
    """Real Sentinel-2 L2A scenes: ``.bench-data/*.tif`` (copied there to travel with the
    tree), else the shared full tile, plus the bundled crop; the dry run: the bundled 5-date
    Sentinel-2 L1C series (small scenes, small crops)."""
    import os

    from geoexplora import sample

    if profile.accelerator != "gpu":
        return sample.slovenia_scenes()
    local = sorted((ROOT / ".bench-data").glob("*.tif"))
    shared = Path(os.environ.get("GEOEXPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
    tile = shared / "s2-l2a-29RKH-2020-02-19" / "S2A_29RKH_20200219_L2A_12band_200m.tif"
    return (local or ([tile] if tile.exists() else [])) + [sample.s2_tile_crop()]


def adapt_diagnostics(profile: Profile, target: list[Path], work: Path) -> dict:
    """The first ``diag_steps`` steps of ``adapt()`` on ``target``: its log's diagnostics."""
    from geoexplora.pipelines.adapt import AdaptConfig, adapt
    from geoexplora.train.engine import RunFiles, read_log

    output = work / "diagnostics.pt"
    cfg = AdaptConfig(
        inputs=target,
        output=output,
        bands=profile.diag_bands.split(","),
        init=profile.diag_model,
        init_weights="random",
        arch_overrides={"init_values": 1.0},
        steps=profile.diag_steps,
        batch_size=profile.diag_batch,
        crop_size=profile.crop,
        local_crop_size=profile.local_crop,
        local_crops=profile.local_crops,
        lora_rank=profile.lora_rank,
        accelerator=profile.accelerator,
        precision=profile.precision,
        overwrite=True,
        checkpoint_every=10**9,
        progress=False,
    )
    start = time.perf_counter()
    summary = adapt(cfg).report
    wall = time.perf_counter() - start
    records = read_log(RunFiles(output).log)
    tenth = max(1, len(records) // 10)

    def mean(rows, key):
        values = [r[key] for r in rows if key in r]
        return sig(sum(values) / len(values)) if values else None

    release_memory()
    return {
        "benchmark": "gpu_adapt_diagnostics",
        "model": profile.diag_model,
        "target": [p.name for p in target],
        "bands": profile.diag_bands,
        "steps": summary["steps"],
        "global_batch": summary["global_batch"],
        "window": summary["data"].get("window"),
        "wall_s": round(wall, 1),
        "first": {k: mean(records[:tenth], k) for k in DIAGNOSTICS},
        "last": {k: mean(records[-tenth:], k) for k in DIAGNOSTICS},
        "stalled": summary["stalled"],
        "warnings": summary["warnings"],
    }


def predict_throughput(profile: Profile, work: Path) -> dict:
    """``predict()`` of a random ViT-B/14 (tiny on CPU) segmentation model, MP/s."""
    import torch

    from geoexplora.bands import get_band
    from geoexplora.io.scene import SceneOptions
    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model
    from geoexplora.models.heads import TaskModel, build_head
    from geoexplora.pipelines.predict import PredictConfig, predict

    arch = profile.models[0]
    torch.manual_seed(0)
    vit = build_backbone(
        init=arch,
        init_weights="random",
        bands=[get_band("sentinel2", b) for b in ("B2", "B3", "B4", "B8")],
        img_size=profile.crop,
    )
    classes = [{"id": i, "name": f"class{i}", "color": "#000000"} for i in range(4)]
    model = save_model(
        work / "predict-model.pt",
        TaskModel(
            vit, build_head("segmentation", vit.embed_dim, len(classes)), "segmentation", classes
        ),
        overwrite=True,
    )
    raster = synthetic_scene(work / "predict-scene.tif", profile.predict_size, seed=1)
    device = "cuda" if profile.accelerator == "gpu" else "cpu"
    cfg = PredictConfig(
        model=Path(model),
        inputs=[raster],
        output=work / "pred.tif",
        window=profile.crop,
        batch_size=profile.predict_batch,
        device=device,
        overwrite=True,
        scene=SceneOptions(sensor="sentinel2"),
    )
    predict(
        replace(
            cfg,
            output=work / "warm.tif",
            inputs=[synthetic_scene(work / "warm-scene.tif", profile.crop * 4, seed=2)],
        )
    )  # CUDA context, kernels
    start = time.perf_counter()
    result = predict(cfg)[0].report
    wall = time.perf_counter() - start
    megapixels = profile.predict_size**2 / 1e6
    return {
        "benchmark": "gpu_predict",
        "model": arch,
        "window": profile.crop,
        "batch_size": profile.predict_batch,
        "megapixels": round(megapixels, 2),
        "wall_s": round(wall, 2),
        "megapixels_per_s": round(megapixels / wall, 2),
        "timings": result.get("timings"),
    }


DDP_LAUNCHER = "import sys\nfrom geoexplora.cli import main\nsys.exit(main())\n"


def ddp_sanity(profile: Profile, scene: Path, work: Path) -> dict:
    """A 2-step ``adapt --devices N``; adapt itself fails if the replicas differ."""
    import torch

    n = torch.cuda.device_count() if profile.accelerator == "gpu" else 0
    if n < 2:
        return {"benchmark": "gpu_ddp", "skipped": f"{n} GPU(s): needs more than one"}
    launcher = work / "geoexplora_cli.py"  # Lightning re-runs this script once per device
    launcher.write_text(DDP_LAUNCHER)
    cmd = [
        sys.executable,
        str(launcher),
        "-q",
        "adapt",
        str(scene),
        "--sensor",
        "sentinel2",
        "--init",
        profile.models[0],
        "--init-weights",
        "random",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--devices",
        str(n),
        "-o",
        str(work / "ddp.pt"),
        "--overwrite",
        "--json",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    doc = {
        "benchmark": "gpu_ddp",
        "devices": n,
        "exit_code": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if proc.returncode == 0:
        summary = json.loads(proc.stdout)
        doc.update(
            world_size=summary["world_size"],
            replicas_identical=len(set(summary["replica_checksums"])) == 1,
        )
    else:
        doc["stderr_tail"] = proc.stderr[-2000:]
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny configurations on CPU (checks the script, not the GPU)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=SPEC_BF16_TFLOPS,
        help="the GPU's spec peak for MFU (default: H100/H200 dense bf16)",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated: step,paper,e2e,diagnostics,predict,ddp"
    )
    parser.add_argument(
        "--target",
        default=None,
        help="comma-separated scenes for the diagnostics run (default: see default_target)",
    )
    args = parser.parse_args(argv)
    profile = DRY if args.dry_run else GPU
    skip = {s for s in args.skip.split(",") if s}
    import torch

    from geoexplora.log import set_verbosity

    set_verbosity(-1)
    if profile.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --dry-run on a CPU machine")
    measured = measured_peak_tflops(profile)
    peaks = {
        "spec": args.peak_tflops if profile.accelerator == "gpu" else None,
        "measured_matmul": measured,
    }
    emit(
        {
            "benchmark": "gpu_peak",
            "device": str(device_of(profile)),
            "dtype": "bf16" if profile.accelerator == "gpu" else "fp32",
            "matmul_size": profile.matmul_size,
            "measured_tflops": sig(measured),
            "spec_tflops": peaks["spec"],
            "torch": torch.__version__,
        }
    )
    failures = 0
    with tempfile.TemporaryDirectory(prefix="geoexplora-gpu-bench-") as tmp:
        work = Path(tmp)
        scene = synthetic_scene(work / "adapt-scene.tif", profile.scene_size)
        for model in profile.models:
            step_rate = None
            for mode in ("explora", "full"):
                if "step" in skip:
                    continue
                doc = adapt_step(profile, model, mode, scene, work, peaks)
                release_memory()
                step_rate = step_rate or doc["images_per_s"]
                emit(doc)
            if "paper" not in skip:
                emit(
                    adapt_step(
                        profile,
                        model,
                        "explora",
                        scene,
                        work,
                        peaks,
                        batch_size=profile.paper_batch,
                    )
                )
                release_memory()
            if "e2e" not in skip and step_rate:
                emit(adapt_end_to_end(profile, model, scene, work, step_rate))
        if "diagnostics" not in skip:
            target = (
                [Path(p) for p in args.target.split(",")]
                if args.target
                else default_target(profile)
            )
            emit(adapt_diagnostics(profile, target, work))
        if "predict" not in skip:
            emit(predict_throughput(profile, work))
        if "ddp" not in skip:
            doc = ddp_sanity(profile, scene, work)
            failures += doc.get("exit_code", 0) != 0 or doc.get("replicas_identical") is False
            emit(doc)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
