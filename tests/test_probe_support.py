"""Helpers shared by the probe and finetune tests (no tests here): real chips datasets built once
per test session, tiny random models matching them, and single-threaded torch (the CI machine's
2 cores are shared; torch's thread pool is much slower than one thread when they are busy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

NC_BANDS = {str(i): f"B{i}" for i in range(1, 6)}  # landsat_multiband.tif holds ETM+ B1..B5


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tile_once(base: Path, name: str, **config) -> Path:
    """``tile(TileConfig(**config))`` into ``base/name``, unless an earlier test built it."""
    from geoexplora.pipelines.tile import TileConfig, tile

    out = Path(base) / name
    if not (out / "dataset.json").is_file():
        tile(TileConfig(out=out, show_progress=False, overwrite=True, **config))
    return out


def nc_landsat7_chips(base: Path, shared: Path, stride: int = 28, val_fraction: float = 0.2,
                      test_fraction: float = 0.2) -> Path:
    """Landsat-7 ETM+ North Carolina (B1..B5), 28 px chips labelled by the 7-class pixel raster
    (the chip's majority class), spatially blocked splits."""
    d = shared / "landsat7-nc-2000"
    return tile_once(base, f"nc_landsat7_{stride}_{val_fraction}_{test_fraction}",
                     scenes=[d / "landsat_multiband.tif"], sensor="landsat7", band_map=NC_BANDS,
                     label_raster=d / "landsat96_labelled_pixels.tif", task="classification",
                     size=28, stride=stride, val_fraction=val_fraction,
                     test_fraction=test_fraction)


def landsat8_polygon_chips(base: Path, shared: Path) -> Path:
    """Landsat-8 OLI (B2, B3, B4), 28 px chips labelled by the land-cover polygons."""
    d = shared / "landsat8-224078-2020-05-18"
    stem = "LC08_L1TP_224078_20200518_20200518_01_RT"
    return tile_once(base, "landsat8_polygons", scenes=[d / f"{stem}.TIF"], sensor="landsat8",
                     band_map={"1": "B2", "2": "B3", "3": "B4"},
                     labels=d / f"{stem}_polygons.gpkg", label_field="name",
                     task="classification", size=28, stride=28, val_fraction=0.2,
                     test_fraction=0.2)


def bigearthnet_chips(base: Path, shared: Path, size: int = 32) -> Path:
    """The six BigEarthNet-S2 patches as a multi-label chips dataset (B2, B3, B4, B8 at 10 m,
    the central ``size`` px of each patch, its CORINE labels); 4 train, 1 val, 1 test.

    ``tile`` cannot read per-patch label lists, so this writes the documented chips format
    (docs/architecture.md) with the library's chip writer.
    """
    out = Path(base) / "bigearthnet"
    if (out / "dataset.json").is_file():
        return out
    import geopandas as gpd
    import pandas as pd
    from rasterio.windows import Window, bounds
    from rasterio.windows import transform as window_transform
    from shapely.geometry import box

    from geoexplora.io import chips as C
    from geoexplora.io.scene import SceneOptions, open_scene

    root = shared / "bigearthnet-s2-examples"
    patches = sorted(p for p in root.iterdir() if p.is_dir())
    labels = {p.name: json.loads(next(p.glob("*_labels_metadata.json")).read_text())["labels"]
              for p in patches}
    names = sorted({name for v in labels.values() for name in v})
    (out / C.CHIPS_DIR).mkdir(parents=True)
    records, pixels = [], []
    splits = ["train"] * 4 + ["val", "test"]
    for patch, split in zip(patches, splits):
        files = [next(patch.glob(f"*_{b}.tif")) for b in ("B02", "B03", "B04", "B08")]
        scene = open_scene(files, SceneOptions(sensor="sentinel2"))
        off = (scene.width - size) // 2
        window = Window(off, off, size, size)
        data = scene.read(window)
        path = f"{C.CHIPS_DIR}/{patch.name}.tif"
        C.write_chip(out / path, data, window_transform(window, scene.transform), scene.crs,
                     scene.bands, scene.dates)
        pixels.append(data.reshape(-1, size * size))
        records.append({
            "chip_id": patch.name, "path": path, "mask_path": None,
            "geometry": box(*bounds(window, scene.transform)), "crs": scene.crs.to_string(),
            "source": patch.name, "col_off": off, "row_off": off, "width": size,
            "height": size, "dates": ";".join(d or "" for d in scene.dates), "label": -1,
            "labels": ";".join(str(names.index(n)) for n in labels[patch.name]),
            "nodata_fraction": 0.0, "split": split})
    # Each patch has its own UTM zone: footprints are stored in WGS84.
    frames = [gpd.GeoDataFrame([r], geometry="geometry", crs=r["crs"]).to_crs(4326)
              for r in records]
    index = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry",
                             crs=4326)
    index.to_parquet(out / C.INDEX_NAME, index=False)
    values = np.concatenate(pixels, axis=1)
    meta = {
        "format_version": C.FORMAT_VERSION, "task": "multilabel",
        "bands": [{**b.to_dict(), "key": b.key} for b in scene.bands], "num_frames": 1,
        "chip_size": size, "units": C.UNITS,
        "stats": {"mean": values.mean(1).tolist(), "std": values.std(1).tolist(),
                  "p2": np.percentile(values, 2, axis=1).tolist(),
                  "p98": np.percentile(values, 98, axis=1).tolist()},
        "classes": [{"id": i, "name": n, "color": C.class_color(i)} for i, n in enumerate(names)],
        "counts": {}, "provenance": {"tool": "tests/test_probe_support.py", "sources": [
            str(p) for p in patches]},
    }
    (out / C.META_NAME).write_text(json.dumps(meta, indent=2))
    return out


def tiny_model_file(path: Path, chips: Path, arch: str = "geo_vit_tiny_patch14", seed: int = 0,
                    **arch_overrides) -> Path:
    """A random-init tiny GeoViT (dim 64, depth 4) for the chips' bands, dates and size."""
    import torch

    from geoexplora.io.chips import load_dataset_meta
    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model

    meta = load_dataset_meta(chips)
    torch.manual_seed(seed)
    vit = build_backbone(arch, init_weights="random", bands=[b["key"] for b in meta["bands"]],
                         stats={"mean": meta["stats"]["mean"], "std": meta["stats"]["std"]},
                         img_size=meta["chip_size"], num_frames=meta["num_frames"],
                         arch_overrides=arch_overrides or None)
    save_model(path, vit)
    return path
