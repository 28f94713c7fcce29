"""Small chips datasets built from the bundled real sample by ``tile()``, for other tests.

    from chips_factory import make_chips_dataset
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
"""

from __future__ import annotations

from pathlib import Path

from geoexplora import sample
from geoexplora.pipelines.tile import TileConfig, tile

KINDS = ("classification", "segmentation", "temporal_segmentation", "multilabel", "unlabeled")


def kind_config(out: Path, kind: str, size: int = 32) -> TileConfig:
    single_date = sample.slovenia_scenes()[:1]
    # Half-overlapping chips; seed 1 gives train and val chips with two majority classes.
    common = {"out": out, "size": size, "stride": size // 2, "split_block": size,
              "val_fraction": 0.4, "seed": 1, "show_progress": False, "overwrite": True}
    if kind == "classification":
        return TileConfig(scenes=single_date, label_raster=sample.slovenia_labels(),
                          task="classification", **common)
    if kind == "segmentation":
        return TileConfig(scenes=single_date, label_raster=sample.slovenia_labels(),
                          task="segmentation", **common)
    if kind == "temporal_segmentation":
        return TileConfig(scenes=sample.slovenia_scenes(), label_raster=sample.slovenia_labels(),
                          task="segmentation", **common)
    if kind == "multilabel":
        return TileConfig(scenes=single_date, label_raster=sample.slovenia_labels(),
                          task="multilabel", min_label_fraction=0.02, **common)
    if kind == "unlabeled":
        return TileConfig(scenes=[sample.s2_tile_crop()], task="none",
                          **{**common, "stride": size, "split_block": 2 * size, "seed": 0})
    raise ValueError(f"unknown kind '{kind}'; one of {', '.join(KINDS)}")


def make_chips_dataset(out_dir, kind: str, size: int = 32, **overrides) -> Path:
    """Build the ``kind`` dataset at ``out_dir / kind`` (replaced if present); returns its path."""
    cfg = kind_config(Path(out_dir) / kind, kind, size)
    for name, value in overrides.items():
        if not hasattr(cfg, name):
            raise TypeError(f"TileConfig has no field '{name}'")
        setattr(cfg, name, value)
    return tile(cfg).out
