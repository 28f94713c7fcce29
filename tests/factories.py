"""Builders shared by the tests (no tests here): chips datasets made by ``tile()`` from real data,
tiny timm ViTs with non-trivial weights, checkpoint files in the real key layouts, and tiny
model files.

Chips datasets (``make_chips_dataset``):

    Small chips datasets built from the bundled real sample by ``tile()``, for other tests.

        from factories import make_chips_dataset
        root = make_chips_dataset(tmp_path, "segmentation")      # -> tmp_path / "segmentation"
        ds = ChipsDataset(root, split="train")

    Kinds (all from ``geoexplora/data``, so they never skip; 32 px chips, seconds to build):

    - ``classification``: Slovenia 2015-07-11 (13 bands, T=1), per-chip majority of the LULC raster.
    - ``segmentation``: the same chips with LULC masks (255 = no label).
    - ``temporal_segmentation``: the 5-date Slovenia series (T=5) with LULC masks.
    - ``multilabel``: Slovenia 2015-07-11, the LULC classes covering >= 2 % of each chip.
    - ``unlabeled``: the Sentinel-2 L2A 29RKH crop (12 bands, 200 m, 256 x 256 px), no labels.

    Every kind has train and val chips (spatially blocked splits). ``overrides`` are TileConfig
    fields (e.g. ``size=16``, ``bands=["B2", "B3", "B4", "B8"]``).

Models: tiny timm ViTs with non-trivial weights (``timm_model``), checkpoint files in the real
key layouts (timm, Meta DINOv2, MAE), tiny random model files for chips datasets
(``tiny_model_file``) and task model files for predict and embed (``make_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from geoexplora import sample
from geoexplora.bands import get_band
from geoexplora.models.registry import ARCHITECTURES
from geoexplora.pipelines.tile import TileConfig, tile

# --- chips datasets ---------------------------------------------------------------------------

KINDS = ("classification", "segmentation", "temporal_segmentation", "multilabel", "unlabeled")


def kind_config(out: Path, kind: str, size: int = 32) -> TileConfig:
    single_date = sample.slovenia_scenes()[:1]
    # Half-overlapping chips; seed 1 gives train and val chips with two majority classes.
    common = {
        "output": out,
        "size": size,
        "stride": size // 2,
        "split_block": size,
        "val_fraction": 0.4,
        "seed": 1,
        "progress": False,
        "overwrite": True,
    }
    if kind == "classification":
        return TileConfig(
            inputs=single_date,
            label_raster=sample.slovenia_labels(),
            task="classification",
            **common,
        )
    if kind == "segmentation":
        return TileConfig(
            inputs=single_date, label_raster=sample.slovenia_labels(), task="segmentation", **common
        )
    if kind == "temporal_segmentation":
        return TileConfig(
            inputs=sample.slovenia_scenes(),
            label_raster=sample.slovenia_labels(),
            task="segmentation",
            **common,
        )
    if kind == "multilabel":
        return TileConfig(
            inputs=single_date,
            label_raster=sample.slovenia_labels(),
            task="multilabel",
            min_label_fraction=0.02,
            **common,
        )
    if kind == "unlabeled":
        return TileConfig(
            inputs=[sample.s2_tile_crop()],
            task="none",
            **{**common, "stride": size, "split_block": 2 * size, "seed": 0},
        )
    raise ValueError(f"unknown kind '{kind}'; one of {', '.join(KINDS)}")


def make_chips_dataset(out_dir, kind: str, size: int = 32, **overrides) -> Path:
    """Build the ``kind`` dataset at ``out_dir / kind`` (replaced if present); returns its path."""
    cfg = kind_config(Path(out_dir) / kind, kind, size)
    for name, value in overrides.items():
        if not hasattr(cfg, name):
            raise TypeError(f"TileConfig has no field '{name}'")
        setattr(cfg, name, value)
    return tile(cfg).output


# --- models and checkpoints ---------------------------------------------------------------------

TINY = "geo_vit_tiny_patch14"
TINY_REG = "geo_vit_tiny_patch14_reg4"
TINY_MAE = "geo_vit_tiny_patch16"


def s2(*names):
    return [get_band("sentinel2", n) for n in names]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from timm's init (whose tiny layer scale and cls token hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def timm_model(arch_name: str, img_size: int = 56, seed: int = 0, **extra):
    """A randomised timm ViT of a registry architecture (headless, dynamic size)."""
    import timm

    arch = ARCHITECTURES[arch_name]
    kwargs = arch.timm_kwargs(
        dict(num_classes=0, img_size=img_size, dynamic_img_size=True, **extra)
    )
    return randomise(timm.create_model(arch.timm_name, pretrained=False, **kwargs), seed).eval()


def to_meta_dinov2(timm_sd: dict, reg_tokens: int, seed: int = 1) -> dict:
    """timm DINOv2 keys -> Meta's original layout (pos_embed always carries the cls slot;
    registers as ``register_tokens``; a learned ``mask_token``)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in timm_sd.items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = 0.05 * torch.randn(1, dim, generator=gen)
    if reg_tokens:
        cls_pos = 0.05 * torch.randn(1, 1, dim, generator=gen)
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["register_tokens"] = sd.pop("reg_token")
    return sd


def mae_decoder_state(dim_dec: int = 32, patch: int = 16, chans: int = 3, n_tokens: int = 197):
    gen = torch.Generator().manual_seed(2)
    r = lambda *s: 0.05 * torch.randn(*s, generator=gen)
    return {
        "mask_token": r(1, 1, dim_dec),
        "decoder_embed.weight": r(dim_dec, 64),
        "decoder_embed.bias": r(dim_dec),
        "decoder_pos_embed": r(1, n_tokens, dim_dec),
        "decoder_blocks.0.norm1.weight": r(dim_dec),
        "decoder_blocks.0.attn.qkv.weight": r(3 * dim_dec, dim_dec),
        "decoder_norm.weight": r(dim_dec),
        "decoder_norm.bias": r(dim_dec),
        "decoder_pred.weight": r(patch * patch * chans, dim_dec),
        "decoder_pred.bias": r(patch * patch * chans),
    }


def zscore(x: torch.Tensor, bands) -> torch.Tensor:
    mean = torch.tensor([b.mean for b in bands]).view(-1, 1, 1)
    std = torch.tensor([b.std for b in bands]).view(-1, 1, 1)
    return (x - mean) / std


# --- probe and finetune: real datasets, tiny model files -----------------------------------------

NC_BANDS = {str(i): f"B{i}" for i in range(1, 6)}  # landsat_multiband.tif holds ETM+ B1..B5


def tile_once(base: Path, name: str, **config) -> Path:
    """``tile(TileConfig(**config))`` into ``base/name``, unless an earlier test built it."""
    from geoexplora.pipelines.tile import TileConfig, tile

    out = Path(base) / name
    if not (out / "dataset.json").is_file():
        tile(TileConfig(output=out, progress=False, overwrite=True, **config))
    return out


def nc_landsat7_chips(
    base: Path,
    shared: Path,
    stride: int = 28,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Path:
    """Landsat-7 ETM+ North Carolina (B1..B5), 28 px chips labelled by the 7-class pixel raster
    (the chip's majority class), spatially blocked splits."""
    d = shared / "landsat7-nc-2000"
    return tile_once(
        base,
        f"nc_landsat7_{stride}_{val_fraction}_{test_fraction}",
        inputs=[d / "landsat_multiband.tif"],
        sensor="landsat7",
        band_map=NC_BANDS,
        label_raster=d / "landsat96_labelled_pixels.tif",
        task="classification",
        size=28,
        stride=stride,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def landsat8_polygon_chips(base: Path, shared: Path) -> Path:
    """Landsat-8 OLI (B2, B3, B4), 28 px chips labelled by the land-cover polygons."""
    d = shared / "landsat8-224078-2020-05-18"
    stem = "LC08_L1TP_224078_20200518_20200518_01_RT"
    return tile_once(
        base,
        "landsat8_polygons",
        inputs=[d / f"{stem}.TIF"],
        sensor="landsat8",
        band_map={"1": "B2", "2": "B3", "3": "B4"},
        labels=d / f"{stem}_polygons.gpkg",
        label_field="name",
        task="classification",
        size=28,
        stride=28,
        val_fraction=0.2,
        test_fraction=0.2,
    )


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
    labels = {
        p.name: json.loads(next(p.glob("*_labels_metadata.json")).read_text())["labels"]
        for p in patches
    }
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
        C.write_chip(
            out / path,
            data,
            window_transform(window, scene.transform),
            scene.crs,
            scene.bands,
            scene.dates,
        )
        pixels.append(data.reshape(-1, size * size))
        records.append(
            {
                "chip_id": patch.name,
                "path": path,
                "mask_path": None,
                "geometry": box(*bounds(window, scene.transform)),
                "crs": scene.crs.to_string(),
                "source": patch.name,
                "col_off": off,
                "row_off": off,
                "width": size,
                "height": size,
                "dates": ";".join(d or "" for d in scene.dates),
                "label": -1,
                "labels": ";".join(str(names.index(n)) for n in labels[patch.name]),
                "nodata_fraction": 0.0,
                "split": split,
            }
        )
    # Each patch has its own UTM zone: footprints are stored in WGS84.
    frames = [
        gpd.GeoDataFrame([r], geometry="geometry", crs=r["crs"]).to_crs(4326) for r in records
    ]
    index = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=4326)
    index.to_parquet(out / C.INDEX_NAME, index=False)
    values = np.concatenate(pixels, axis=1)
    meta = {
        "format_version": C.FORMAT_VERSION,
        "task": "multilabel",
        "bands": [{**b.to_dict(), "key": b.key} for b in scene.bands],
        "num_frames": 1,
        "chip_size": size,
        "units": C.UNITS,
        "stats": {
            "mean": values.mean(1).tolist(),
            "std": values.std(1).tolist(),
            "p2": np.percentile(values, 2, axis=1).tolist(),
            "p98": np.percentile(values, 98, axis=1).tolist(),
        },
        "classes": [{"id": i, "name": n, "color": C.class_color(i)} for i, n in enumerate(names)],
        "counts": {},
        "provenance": {"tool": "tests/factories.py", "sources": [str(p) for p in patches]},
    }
    (out / C.META_NAME).write_text(json.dumps(meta, indent=2))
    return out


def tiny_model_file(
    path: Path, chips: Path, arch: str = "geo_vit_tiny_patch14", seed: int = 0, **arch_overrides
) -> Path:
    """A random-init tiny GeoViT (dim 64, depth 4) for the chips' bands, dates and size."""
    import torch

    from geoexplora.io.chips import load_dataset_meta
    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model

    meta = load_dataset_meta(chips)
    torch.manual_seed(seed)
    vit = build_backbone(
        arch,
        init_weights="random",
        bands=[b["key"] for b in meta["bands"]],
        stats={"mean": meta["stats"]["mean"], "std": meta["stats"]["std"]},
        img_size=meta["chip_size"],
        num_frames=meta["num_frames"],
        arch_overrides=arch_overrides or None,
    )
    save_model(path, vit)
    return path


# --- task model files (predict, embed) -----------------------------------------------------------

CLASSES = [
    {"id": 0, "name": "water", "color": "#0000ff"},
    {"id": 1, "name": "crop", "color": "#ffff00"},
    {"id": 2, "name": "tree", "color": None},
]


def make_model(
    path: Path,
    task: str = "segmentation",
    bands=("sentinel2:B2", "sentinel2:B3", "sentinel2:B4", "sentinel2:B8"),
    frames: int = 1,
    img_size: int = 56,
    seed: int = 0,
) -> Path:
    """A tiny random model file (depth 2, dim 32, patch 14) with a task head, or a backbone
    (task None)."""
    import torch

    from geoexplora.bands import band_from_key
    from geoexplora.models.builder import build_backbone
    from geoexplora.models.file import save_model
    from geoexplora.models.heads import TaskModel, build_head

    torch.manual_seed(seed)
    vit = build_backbone(
        "geo_vit_tiny_patch14",
        init_weights="random",
        bands=[band_from_key(b) for b in bands],
        img_size=img_size,
        num_frames=frames,
        arch_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2},
    )
    if task is None:
        return save_model(path, vit)
    head = build_head(
        task, vit.embed_dim, len(CLASSES), **({"hidden": 16} if task == "segmentation" else {})
    )
    with torch.no_grad():  # a random head predicts one class everywhere; make it vary
        for p in head.parameters():
            p.normal_(0, 0.5)
    return save_model(path, TaskModel(vit, head, task, CLASSES))
