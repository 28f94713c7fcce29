"""Predict benchmark: end-to-end throughput vs the model's forward alone, and peak memory vs
raster size. Prints one JSON line per measurement.

* throughput: ``geoexplora predict`` on a SIZE x SIZE VRT mosaic of a real Sentinel-2 scene
  (pixels/s of the whole call: model load, reading, forward, blending, strips, COG), then the
  model's forward alone on the same windows (read into memory beforehand, same batches) in the
  same process. Target: end-to-end >= 85% of forward-only.
* memory: peak RSS of a child process predicting a 2 000^2 and a 20 000^2 mosaic. The large one
  predicts a band of rows (``--large-rows``, all 20 000 columns; memory depends on the width, not
  the height) to keep the run short. Target: large <= 1.25 x small.

Usage: python benchmarks/predict.py [--model model.pt] [--device cuda] [--window 224]
       [--batch-size 16] [--large-rows 1024]
Without --model a tiny random segmentation model (depth 2, dim 32, 56 px windows) is built.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT.parent / "shared/data/s2-l2a-29RKH-2020-02-19/S2A_29RKH_20200219_L2A_12band_200m.tif"
FALLBACK_SCENE = ROOT / "geoexplora/data/s2-29RKH/S2A_29RKH_20200219_L2A_12band_200m_crop.tif"


def mosaic_vrt(source: Path, size: int, path: Path) -> Path:
    """A size x size VRT tiling ``source``'s B2, B3, B4, B8 (no large file on disk)."""
    from xml.sax.saxutils import escape

    import rasterio

    with rasterio.open(source) as src:
        w, h, t, crs, names = src.width, src.height, src.transform, src.crs, src.descriptions
    lines = [
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">',
        f"<SRS>{escape(crs.to_wkt())}</SRS>",
        f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>",
    ]
    wanted = [(i, n) for i, n in enumerate(names, start=1) if n in ("B02", "B03", "B04", "B08")]
    for k, (band, name) in enumerate(wanted, start=1):
        lines.append(f'<VRTRasterBand dataType="UInt16" band="{k}">')
        lines.append(f"<Description>{name}</Description><NoDataValue>0</NoDataValue>")
        for y in range(0, size, h):
            for x in range(0, size, w):
                lines.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{source}'
                    f"</SourceFilename><SourceBand>{band}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>'
                    "</SimpleSource>"
                )
        lines.append("</VRTRasterBand>")
    path.write_text("\n".join([*lines, "</VRTDataset>"]))
    return path


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_predict import make_model

    return make_model(path)


def _config(args, raster: Path, output: Path, shard: str | None = None):
    from geoexplora.io.scene import SceneOptions
    from geoexplora.pipelines.predict import PredictConfig

    return PredictConfig(
        model=Path(args.model),
        inputs=[raster],
        output=output,
        window=args.window,
        batch_size=args.batch_size,
        device=args.device,
        shard=shard,
        overwrite=True,
        scene=SceneOptions(sensor="sentinel2"),
    )


def throughput(args, work: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from rasterio.windows import Window

    from geoexplora.inference import engine
    from geoexplora.inference.model import predictor_from_model, resolve_devices
    from geoexplora.log import set_verbosity
    from geoexplora.models.file import load_model
    from geoexplora.pipelines.predict import make_plan, open_model_scene, predict

    set_verbosity(-1)
    raster = mosaic_vrt(args.scene, args.size, work / f"mosaic_{args.size}.vrt")
    t0 = time.perf_counter()
    result = predict(_config(args, raster, work / "pred.tif"))[0].report
    end_to_end = time.perf_counter() - t0

    model = load_model(args.model)
    scene, read, _ = open_model_scene(
        [raster], _config(args, raster, work / "x").scene, model.meta, args.model
    )
    device = resolve_devices(args.device, None)[0]
    predictor = predictor_from_model(model, read.days)
    plan = make_plan(scene, predictor, args.window, None, False)
    forward = predictor.make_forward(device)
    tiles = list(plan.tiles())
    batches, current = [], []
    for tile in tiles:  # the engine's batches: same windows, never across a window row
        if current and (tile.row != current[0].row or len(current) == args.batch_size):
            batches.append(current)
            current = []
        current.append(tile)
    batches.append(current)
    data = [
        np.stack([scene.read(Window(t.col, t.row, plan.window, plan.window)) for t in b])
        for b in batches
    ]
    runner = engine._Runner(forward, device, plan.tile_out_size)
    # In a worker thread, as in the engine: torch's CPU threading differs between the main
    # thread and others (on a loaded machine by several times), so the same thread kind is fair.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(runner, data[0]).result()  # warm-up
        forward_only = sum(pool.submit(runner, x).result()[1] for x in data)
    pixels = args.size**2
    return {
        "benchmark": "predict_throughput",
        "size": args.size,
        "windows": len(tiles),
        "window": plan.window,
        "batch_size": args.batch_size,
        "device": str(device),
        "end_to_end_s": round(end_to_end, 3),
        "engine_wall_s": result["timings"]["wall_s"],
        "forward_only_s": round(forward_only, 3),
        "end_to_end_px_per_s": round(pixels / end_to_end),
        "forward_only_px_per_s": round(pixels / forward_only),
        "ratio": round(forward_only / end_to_end, 3),
        "engine_ratio": round(forward_only / result["timings"]["wall_s"], 3),
        "target": ">= 0.85",
    }


def child(args) -> None:
    """Predict one raster (or a band of rows of it) and print peak RSS."""
    import torch  # noqa: F401  (imported before the baseline, as predict would)

    from geoexplora.log import set_verbosity
    from geoexplora.models.file import load_model
    from geoexplora.pipelines.predict import predict

    set_verbosity(-1)
    load_model(args.model)  # warm imports (timm) so the baseline holds them
    work = Path(args.work)
    raster = mosaic_vrt(args.scene, args.size, work / f"mosaic_{args.size}.vrt")
    shard = None
    if args.rows:
        shard = f"1/{max(1, args.size // args.rows)}"
    cfg = _config(args, raster, work / f"pred_{args.size}.tif", shard)
    baseline = _rss_mb()
    peak, stop = [baseline], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = predict(cfg)[0].report
    stop.set()
    sampler.join()
    print(
        json.dumps(
            {
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_before_predict_mb": round(baseline, 1),
                "peak_rss_during_predict_mb": round(peak[0], 1),
                "seconds": round(time.perf_counter() - t0, 2),
                "shard": shard,
                "windows": result["timings"]["windows"],
            }
        )
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss(args, size: int, rows: int | None, work: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--size",
        str(size),
        "--work",
        str(work),
        "--model",
        str(args.model),
        "--scene",
        str(args.scene),
        "--batch-size",
        str(args.batch_size),
    ]
    cmd += ["--rows", str(rows)] if rows else []
    cmd += ["--window", str(args.window)] if args.window else []
    cmd += ["--device", args.device] if args.device else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--device")
    parser.add_argument("--window", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--large-size", type=int, default=20000)
    parser.add_argument("--large-rows", type=int, default=1024)
    parser.add_argument("--scene", type=Path, default=SCENE if SCENE.exists() else FALLBACK_SCENE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="geoexplora-bench-") as tmp:
        work = Path(tmp)
        if not args.model:
            args.model = str(tiny_model(work / "tiny.pt"))
        print(json.dumps(throughput(args, work)), flush=True)
        small = peak_rss(args, args.size, None, work)
        print(json.dumps({"benchmark": "predict_peak_rss", "size": args.size, **small}), flush=True)
        large = peak_rss(args, args.large_size, args.large_rows, work)
        print(
            json.dumps(
                {
                    "benchmark": "predict_peak_rss",
                    "size": args.large_size,
                    "rows_predicted": args.large_rows,
                    **large,
                    "ratio_to_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                    "growth_ratio_to_small": round(
                        (large["peak_rss_during_predict_mb"] - large["rss_before_predict_mb"])
                        / max(
                            1.0,
                            small["peak_rss_during_predict_mb"] - small["rss_before_predict_mb"],
                        ),
                        3,
                    ),
                    "target": "<= 1.25",
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
