"""The whole pipeline on the bundled real sample: ``geoexplora demo`` and ``make demo``.

tile -> adapt -> probe (source vs adapted) -> finetune -> predict -> quicklook, on the Sentinel-2
L1C series of Slovenia (LULC land-cover labels) plus a Sentinel-2 L2A crop of the Sahara as extra
unlabeled imagery. Small enough for 2 CPU cores in a few minutes; uses a GPU when present.

Initial weights: pre-trained weights cannot be downloaded offline, so by default the source model
is a tiny ViT (``geo_vit_tiny_patch14``, 4 blocks, width 64) with **random** weights: the demo then
shows the mechanics (what trains, what the files hold, how predict checks and writes) rather than
the accuracy a real DINOv2 source gives. Set ``GEOEXPLORA_INIT_WEIGHTS=/path/to/checkpoint`` (and
``GEOEXPLORA_INIT`` to its timm name, default ``vit_small_patch14_dinov2.lvd142m``) to start from
real pre-trained weights instead.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from geoexplora.defaults import DEMO
from geoexplora.devices import fabric_target
from geoexplora.errors import UserError, opt
from geoexplora.io.outputs import check_output
from geoexplora.log import logger
from geoexplora.sample import s2_tile_crop, slovenia_labels, slovenia_scenes

BANDS = ["B2", "B3", "B4", "B8"]
LABELLED_DATE = "2015-07-11"  # a clear date (08-20 is cloudy)
TINY_SOURCE = "geo_vit_tiny_patch14"
PRETRAINED_SOURCE = "vit_small_patch14_dinov2.lvd142m"
CHIP_SIZE = 28  # two patches of 14 px: the Slovenia scene is 100 x 101 px
SPLIT_BLOCK = 2 * CHIP_SIZE  # 2 x 2 blocks on the scene: one of them becomes the val split
VAL_FRACTION = 0.3


@dataclass
class DemoConfig:
    output: Path = Path("demo-out")
    overwrite: bool = False
    adapt_steps: int = DEMO.adapt_steps
    finetune_steps: int = DEMO.finetune_steps
    probe_steps: int = DEMO.probe_steps
    batch_size: int = DEMO.batch_size
    init: str | None = None  # None: the tiny source (with init_weights: PRETRAINED_SOURCE)
    init_weights: str | None = None  # None: "random"
    device: str | None = None
    seed: int = 0


def _source(cfg: DemoConfig) -> tuple[str, str, str]:
    """(init, init_weights, sentence saying which weights and why)."""
    if cfg.init and Path(cfg.init).expanduser().is_file():  # a model file carries its weights
        if cfg.init_weights:
            raise UserError(
                f"{opt('init')} {cfg.init} is a model file; it carries its own weights, so "
                f"drop {opt('init_weights')}"
            )
        return cfg.init, None, f"source: the model file {cfg.init}"
    weights = cfg.init_weights
    if weights and weights != "random":
        init = cfg.init or PRETRAINED_SOURCE
        return init, weights, f"source: {init} with pre-trained weights from {weights}"
    init = cfg.init or TINY_SOURCE
    return (
        init,
        "random",
        (
            f"source: {init} with RANDOM weights (pre-trained weights cannot be "
            "downloaded offline; set GEOEXPLORA_INIT_WEIGHTS to a checkpoint to "
            "start from real ones)"
        ),
    )


def _labelled_scene() -> Path:
    return next(p for p in slovenia_scenes() if LABELLED_DATE in p.name)


def demo(cfg: DemoConfig) -> dict:
    """Run the pipeline into the folder ``cfg.output``; returns the summary document.

    The folder is complete when ``summary.json`` is in it (written last); a failed or interrupted
    run removes what it wrote. ``--overwrite`` replaces only an earlier demo folder.
    """
    for option in ("adapt_steps", "finetune_steps", "probe_steps", "batch_size"):
        value = getattr(cfg, option)
        if value < 1:
            raise UserError(f"must be at least 1, not {value}", option=option)
    out = check_output(cfg.output, cfg.overwrite)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "summary.json").exists()):
            raise UserError(
                f"{opt('output')} {out}: not an earlier demo folder (no summary.json); "
                "refusing to replace it"
            )
        shutil.rmtree(out)
    init, init_weights, source_note = _source(cfg)
    logger.info(source_note)
    timings: dict[str, float] = {}
    out.mkdir(parents=True)
    try:
        summary = _pipeline(cfg, out, init, init_weights, timings)
        summary["source"] = source_note
        summary["seconds"] = timings
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return summary


def _timed(timings: dict, name: str):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            logger.info("demo: %s", name)

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)

    return _Timer()


def _pipeline(
    cfg: DemoConfig, work: Path, init: str, init_weights: str | None, timings: dict
) -> dict:
    from geoexplora.pipelines.adapt import AdaptConfig, adapt
    from geoexplora.pipelines.finetune import FinetuneConfig, finetune
    from geoexplora.pipelines.predict import PredictConfig, predict
    from geoexplora.pipelines.probe import ProbeConfig, probe
    from geoexplora.pipelines.tile import TileConfig, tile

    accelerator, devices = fabric_target(cfg.device)  # cuda:1 trains on GPU 1, as it predicts
    labelled = _labelled_scene()
    chips = work / "chips"
    with _timed(timings, "tile"):
        tiled = tile(
            TileConfig(
                inputs=[labelled],
                output=chips,
                size=CHIP_SIZE,
                stride=CHIP_SIZE // 2,
                bands=BANDS,
                label_raster=slovenia_labels(),
                val_fraction=VAL_FRACTION,
                split_block=SPLIT_BLOCK,
                seed=cfg.seed,
                progress=False,
            )
        )
    with _timed(timings, "source model"):
        source = _write_source_model(work / "source.pt", init, init_weights, chips)
    adapted = work / "adapted.pt"
    with _timed(timings, "adapt"):
        adapt_doc = adapt(
            AdaptConfig(
                inputs=[*slovenia_scenes(), s2_tile_crop()],
                output=adapted,
                bands=BANDS,
                init=str(source),
                steps=cfg.adapt_steps,
                batch_size=cfg.batch_size,
                crop_size=2 * CHIP_SIZE,
                seed=cfg.seed,
                accelerator=accelerator,
                devices=devices,
            )
        ).report
    with _timed(timings, "probe"):
        probe_doc = probe(
            ProbeConfig(
                models=[source, adapted],
                chips=chips,
                steps=cfg.probe_steps,
                device=cfg.device,
                seed=cfg.seed,
            )
        ).report
    model = work / "model.pt"
    with _timed(timings, "finetune"):
        finetune_doc = finetune(
            FinetuneConfig(
                model=adapted,
                chips=chips,
                output=model,
                task="segmentation",
                mode="lora",
                steps=cfg.finetune_steps,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                accelerator=accelerator,
                devices=devices,
            )
        ).report
    prediction = work / "prediction.tif"
    with _timed(timings, "predict"):
        predict_doc = predict(
            PredictConfig(
                model=model,
                inputs=[labelled],
                output=prediction,
                window=2 * CHIP_SIZE,
                device=cfg.device,
            )
        )[0].report
    with _timed(timings, "quicklook"):
        quicklook = write_quicklook(labelled, slovenia_labels(), prediction, work / "quicklook.png")
    probe_rows = [
        {k: m[k] for k in ("name", "top1", "balanced_accuracy", "macro_f1", "knn_top1")}
        for m in probe_doc["models"]
    ]
    val = finetune_doc["metrics"]["val"]
    return {
        "output": str(work),
        "chips": {
            "path": str(chips),
            "count": tiled.chips,
            "splits": tiled.splits,
            "classes": [c["name"] for c in tiled.classes],
        },
        "adapt": {
            "path": str(adapted),
            "steps": adapt_doc["steps"],
            "first_loss": adapt_doc["first_loss"],
            "last_loss": adapt_doc["last_loss"],
            "trainable": adapt_doc["parameters"]["trainable"],
            "total": adapt_doc["parameters"]["total"],
            "loss_curve": adapt_doc["files"]["plot"],
        },
        "probe": {"evaluated_on": probe_doc["evaluated_on"], "models": probe_rows},
        "finetune": {
            "path": str(model),
            "mode": "lora",
            "val": val,
            "first_loss": finetune_doc["train"]["first_loss"],
            "last_loss": finetune_doc["train"]["last_loss"],
        },
        "predict": {
            "path": str(prediction),
            "sidecar": predict_doc.get("sidecar"),
            "valid_pixels": predict_doc.get("valid_pixels"),
        },
        "quicklook": str(quicklook),
    }


def _write_source_model(path: Path, init: str, init_weights: str | None, chips: Path) -> Path:
    """The source model as a model file on the demo's bands, with the chips' statistics, so that
    probe can compare it with the adapted one and adapt can start from it."""
    from geoexplora.io.chips import load_dataset_meta
    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model

    meta = load_dataset_meta(chips)
    vit = build_backbone(
        init=init,
        init_weights=init_weights,
        bands=[b["key"] for b in meta["bands"]],
        stats=meta["stats"],
        img_size=2 * CHIP_SIZE,
    )
    return save_model(path, vit, {"provenance": {"demo": "source model before adaptation"}})


def write_quicklook(scene_path: Path, labels_path: Path, prediction_path: Path, out: Path) -> Path:
    """PNG: true colour (B4,B3,B2, 2-98 % stretch) | reference land cover | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import rasterio
    from matplotlib.colors import ListedColormap

    from geoexplora.io.scene import SceneOptions, open_scene

    rgb = open_scene([scene_path], SceneOptions(bands=["B4", "B3", "B2"])).read()[0]
    lo, hi = np.nanpercentile(rgb, 2), np.nanpercentile(rgb, 98)
    rgb = np.clip((np.moveaxis(rgb, 0, -1) - lo) / max(hi - lo, 1e-6), 0, 1)
    with rasterio.open(prediction_path) as src:
        pred = src.read(1)
        classes = json.loads(src.tags()["CLASSES"])  # ids, names, colours, source label values
        nodata = src.nodata
    with rasterio.open(labels_path) as src:
        ref_values = src.read(1)
    reference = np.full(ref_values.shape, -1)
    for c in classes:
        reference[ref_values == c["value"]] = c["id"]
    cmap = ListedColormap([c["color"] for c in classes])
    shown = {"cmap": cmap, "vmin": -0.5, "vmax": len(classes) - 0.5, "interpolation": "nearest"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    axes[0].imshow(rgb)
    axes[0].set_title("Sentinel-2 true colour")
    axes[1].imshow(np.ma.masked_less(reference, 0), **shown)
    axes[1].set_title("reference land cover (LULC)")
    axes[2].imshow(np.ma.masked_equal(pred, nodata), **shown)
    axes[2].set_title("prediction (fine-tuned adapted model)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c["color"]) for c in classes]
    fig.legend(
        handles, [c["name"] for c in classes], loc="lower center", ncol=len(classes), fontsize=9
    )
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
