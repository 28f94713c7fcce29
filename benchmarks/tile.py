"""Benchmark ``tile``: chips/s and MB/s against a naive per-window loop and a raw read (the floor).

Prints one JSON line per measurement, then one with the ratios. The naive loop opens the source,
reads one window, converts it and writes it as a chip, window by window (what a short script
would do). The raw read is one sequential read of every input pixel, converted to float32: no
chip can be written faster than the pixels can be read. MB are float32 canonical pixels.

    python benchmarks/tile.py [--scene PATH] [--size 224] [--workers 2]

Default scene: the Landsat-8 scene of ../shared/data (2041 x 1860 x 3), else the bundled
Sentinel-2 crop (256 x 256 x 12).
"""

from __future__ import annotations

import argparse
import json
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
from geoexplora.tiling import TileConfig, tile, window_offsets

L8 = ROOT.parent / "shared" / "data" / "landsat8-224078-2020-05-18" / \
    "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def default_scene() -> tuple[Path, dict]:
    if L8.exists():
        return L8, {"band_map": {"1": "B2", "2": "B3", "3": "B4"}, "nodata": 0}
    return sample.s2_tile_crop(), {}


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def raw_read(scene: Path) -> tuple[float, float]:
    """Seconds and float32 MB of one sequential read of the whole file."""
    start = time.perf_counter()
    with rasterio.open(scene) as src:
        data = src.read().astype(np.float32)
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
                profile = {"driver": "GTiff", "width": size, "height": size, "count": count,
                               "dtype": "float32", "crs": src.crs, "nodata": float("nan"),
                               "transform": window_transform(src.transform, col, row)}
                with rasterio.open(out / f"{row}_{col}.tif", "w", **profile) as dst:
                    dst.write(data)
            n += 1
    return n, time.perf_counter() - start


def run_tile(scene: Path, size: int, out: Path, workers: int, opts: dict) -> tuple[int, float]:
    start = time.perf_counter()
    result = tile(TileConfig(scenes=[scene], out=out, size=size, max_nodata=1.0, val_fraction=0,
                             workers=workers, show_progress=False, **opts))
    return result.chips, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs of each")
    args = parser.parse_args()
    scene, opts = (args.scene, {}) if args.scene else default_scene()
    with rasterio.open(scene) as src:
        bands = src.count
    chip_mb = args.size * args.size * bands * 4 / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        best = {}
        for _ in range(args.repeat):
            runs = {"raw_read": None, "naive": None, "tile_1": None,
                    f"tile_{args.workers}": None}
            seconds, mb = raw_read(scene)
            runs["raw_read"] = (mb / chip_mb, seconds)
            shutil.rmtree(tmp / "naive", ignore_errors=True)
            runs["naive"] = naive(scene, args.size, tmp / "naive", opts.get("nodata"))
            for w in sorted({1, args.workers}):
                shutil.rmtree(tmp / f"tile{w}", ignore_errors=True)
                runs[f"tile_{w}"] = run_tile(scene, args.size, tmp / f"tile{w}", w, opts)
            for name, (chips, seconds) in runs.items():
                if name not in best or seconds < best[name][1]:
                    best[name] = (chips, seconds)
        rates = {}
        for name, (chips, seconds) in best.items():
            rates[name] = {"chips_per_s": chips / seconds, "mb_per_s": chips * chip_mb / seconds}
            emit({"benchmark": "tile", "what": name, "scene": scene.name, "size": args.size,
                  "chips": round(chips, 1), "seconds": round(seconds, 3),
                  "chips_per_s": round(chips / seconds, 1),
                  "mb_per_s": round(chips * chip_mb / seconds, 1)})
        tiled = max((k for k in rates if k.startswith("tile_")),
                    key=lambda k: rates[k]["mb_per_s"])
        emit({"benchmark": "tile", "what": "ratios", "best_tile": tiled,
              "tile_vs_naive": round(rates[tiled]["mb_per_s"] / rates["naive"]["mb_per_s"], 2),
              "tile_vs_raw_read": round(rates[tiled]["mb_per_s"] / rates["raw_read"]["mb_per_s"],
                                        2),
              "targets": {"tile_vs_naive": 3.0, "tile_vs_raw_read": 0.5}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
