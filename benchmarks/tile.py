"""Benchmark ``tile``: chips/s and MB/s against a naive per-window loop and a raw read (the floor).

Prints one JSON line per measurement, then one with the ratios, for each workload:

- ``scene``: the Landsat-8 scene of ../shared/data as it is (2041 x 1860 x 3 uint16, tiled LZW;
  65 chips of 224 px). Small: a dataset's fixed costs (index, statistics, dataset.json, the
  atomic rename) weigh as much as its pixels.
- ``mosaic``: the same pixels tiled 3 x 3 into one 6123 x 5580 file with the same layout, the
  size of a real Landsat scene (610 chips of 224 px).
- ``append``: ``tile --append`` of the scene to the mosaic's dataset, against tiling both from
  scratch (what one would do without ``--append``).

The naive loop opens the source, reads one window, converts it and writes it as a chip, window by
window (what a short script would do). The raw read is one sequential read of every input pixel,
converted to float32: the floor the issue sets (GDAL decoding on one thread); ``raw_read_threads``
is the same read with GDAL decoding on every core, shown for reference. MB are float32 canonical
pixels. Each method runs once untimed, then the best of ``--repeat`` runs counts; the page cache
is flushed (``sync``) before each timed run so one run's writes are not billed to the next.

    python benchmarks/tile.py [--scene PATH --sensor NAME] [--size 224] [--workers 2]

Without ../shared/data the bundled Sentinel-2 crop (256 x 256 x 12) is the only workload.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geoexplora import sample
from geoexplora.io.chips import window_transform
from geoexplora.pipelines.tile import TileConfig, tile, window_offsets

L8 = (
    ROOT.parent
    / "shared"
    / "data"
    / "landsat8-224078-2020-05-18"
    / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
)
L8_OPTS = {"band_map": {"1": "B2", "2": "B3", "3": "B4"}, "nodata": 0, "sensor": "landsat8"}


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def make_mosaic(scene: Path, out: Path, times: int = 3) -> Path:
    """The scene's pixels tiled ``times`` x ``times`` into one file with the same profile."""
    with rasterio.open(scene) as src:
        data, profile = src.read(), src.profile
    big = np.tile(data, (1, times, times))
    profile.update(width=big.shape[2], height=big.shape[1])
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(big)
    return out


def raw_read(scene: Path, threads: str = "1") -> tuple[float, float]:
    """Seconds and float32 MB of one read of the whole file."""
    start = time.perf_counter()
    with rasterio.Env(GDAL_NUM_THREADS=threads), rasterio.open(scene) as src:
        data = src.read(out_dtype="float32")
    return time.perf_counter() - start, data.nbytes / 1e6


def naive(scene: Path, size: int, out: Path, nodata: float | None) -> tuple[int, float]:
    """Open, read, convert and write each window separately."""
    out.mkdir(parents=True)
    with rasterio.open(scene) as src:
        width, height, count = src.width, src.height, src.count
    start = time.perf_counter()
    n = 0
    for row in window_offsets(height, size, size, "drop"):
        for col in window_offsets(width, size, size, "drop"):
            with rasterio.open(scene) as src:
                data = src.read(window=Window(col, row, size, size)).astype(np.float32)
                if nodata is not None:
                    data[data == nodata] = np.nan
                profile = {
                    "driver": "GTiff",
                    "width": size,
                    "height": size,
                    "count": count,
                    "dtype": "float32",
                    "crs": src.crs,
                    "nodata": float("nan"),
                    "transform": window_transform(src.transform, col, row),
                }
                with rasterio.open(out / f"{row}_{col}.tif", "w", **profile) as dst:
                    dst.write(data)
            n += 1
    return n, time.perf_counter() - start


def run_tile(scene: Path, size: int, out: Path, workers: int, opts: dict) -> tuple[int, float]:
    start = time.perf_counter()
    result = tile(
        TileConfig(
            inputs=[scene],
            output=out,
            size=size,
            max_nodata=1.0,
            val_fraction=0,
            workers=workers,
            progress=False,
            **opts,
        )
    )
    return result.chips, time.perf_counter() - start


def measure(workload: str, scene: Path, opts: dict, args, tmp: Path) -> None:
    with rasterio.open(scene) as src:
        bands = src.count
    chip_mb = args.size * args.size * bands * 4 / 1e6

    def methods():
        def read(threads):
            seconds, mb = raw_read(scene, threads)
            return mb / chip_mb, seconds

        yield "raw_read", lambda: read("1")
        yield "raw_read_threads", lambda: read("ALL_CPUS")
        yield "naive", lambda: naive(scene, args.size, tmp / "naive", opts.get("nodata"))
        for w in sorted({1, args.workers}):
            yield f"tile_{w}", lambda w=w: run_tile(scene, args.size, tmp / f"tile{w}", w, opts)

    best: dict[str, tuple[float, float]] = {}
    for attempt in range(args.repeat + 1):  # attempt 0 warms caches and imports, untimed
        for name, run in methods():
            for leftover in tmp.iterdir():
                shutil.rmtree(leftover)
            os.sync()
            chips, seconds = run()
            if attempt and (name not in best or seconds < best[name][1]):
                best[name] = (chips, seconds)
    rates = {}
    for name, (chips, seconds) in best.items():
        rates[name] = chips * chip_mb / seconds
        emit(
            {
                "benchmark": "tile",
                "workload": workload,
                "what": name,
                "scene": scene.name,
                "size": args.size,
                "chips": round(chips, 1),
                "seconds": round(seconds, 3),
                "chips_per_s": round(chips / seconds, 1),
                "mb_per_s": round(rates[name], 1),
            }
        )
    tiled = max((k for k in rates if k.startswith("tile_")), key=rates.get)
    emit(
        {
            "benchmark": "tile",
            "workload": workload,
            "what": "ratios",
            "best_tile": tiled,
            "tile_vs_naive": round(rates[tiled] / rates["naive"], 2),
            "tile_vs_raw_read": round(rates[tiled] / rates["raw_read"], 2),
            "tile_vs_raw_read_threads": round(rates[tiled] / rates["raw_read_threads"], 2),
            "targets": {"tile_vs_naive": 3.0, "tile_vs_raw_read": 0.5},
        }
    )


def measure_append(mosaic: Path, scene: Path, opts: dict, args, tmp: Path) -> None:
    def run(scenes, out, **kw):
        os.sync()
        start = time.perf_counter()
        result = tile(
            TileConfig(
                inputs=scenes,
                output=out,
                size=args.size,
                max_nodata=1.0,
                progress=False,
                **opts,
                **kw,
            )
        )
        return result, time.perf_counter() - start

    best: dict[str, float] = {}
    for attempt in range(args.repeat + 1):  # attempt 0 untimed, as in measure()
        for leftover in tmp.iterdir():
            shutil.rmtree(leftover)
        run([mosaic], tmp / "dataset")
        appended, append_s = run([scene], tmp / "dataset", append=True)
        scratch, scratch_s = run([mosaic, scene], tmp / "scratch")
        if attempt:
            best["append"] = min(best.get("append", math.inf), append_s)
            best["scratch"] = min(best.get("scratch", math.inf), scratch_s)
    emit(
        {
            "benchmark": "tile",
            "workload": "append",
            "what": "ratios",
            "dataset_chips_before": appended.dataset_chips - appended.chips,
            "chips_added": appended.chips,
            "chips_from_scratch": scratch.chips,
            "append_seconds": round(best["append"], 3),
            "from_scratch_seconds": round(best["scratch"], 3),
            "append_vs_from_scratch": round(best["append"] / best["scratch"], 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=Path, help="benchmark this file only")
    parser.add_argument("--sensor", help="the --scene's sensor, when its name does not tell")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed runs of each")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        if args.scene:
            workloads = [("scene", args.scene, {"sensor": args.sensor} if args.sensor else {})]
        elif L8.exists():
            workloads = [
                ("scene", L8, L8_OPTS),
                ("mosaic", make_mosaic(L8, work / "LC08_mosaic_3x3.tif"), L8_OPTS),
            ]
        else:
            workloads = [("scene", sample.s2_tile_crop(), {})]
        for workload, scene, opts in workloads:
            (work / "out").mkdir()
            measure(workload, scene, opts, args, work / "out")
            shutil.rmtree(work / "out")
        if len(workloads) == 2:
            (work / "out").mkdir()
            measure_append(workloads[1][1], workloads[0][1], L8_OPTS, args, work / "out")
            shutil.rmtree(work / "out")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
