"""Builds the small real sample bundled in geoexplora/data from ../shared/data (run once).

- slovenia/: the 5-date Sentinel-2 L1C series (13 bands, 10 m, 100 x 101 px, float32 TOA
  reflectance), its LULC raster and polygons (eo-learn example data, MIT).
- s2-29RKH/: a 256 x 256 crop of the Sentinel-2 L2A 12-band 200 m stack (rio-tiler-pds test
  fixtures, BSD-3-Clause), and the matching crop of the SCL scene classification.
Contains modified Copernicus Sentinel data.
"""

import shutil
import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window

root = Path(__file__).resolve().parents[1]
shared = Path(sys.argv[1] if len(sys.argv) > 1 else root.parent / "shared" / "data")
out = root / "geoexplora" / "data"

slo = out / "slovenia"
slo.mkdir(parents=True, exist_ok=True)
for f in sorted((shared / "s2-l1c-slovenia-2015").glob("S2L1C_*_13band_10m.tif")):
    with rasterio.open(f) as src:
        profile = src.profile | {"compress": "deflate", "predictor": 3, "tiled": False}
        with rasterio.open(slo / f.name, "w", **profile) as dst:
            dst.write(src.read())
            dst.descriptions = src.descriptions
            dst.update_tags(**src.tags())
for name in ("LULC.tif", "LULC.gpkg"):
    shutil.copy(shared / "s2-l1c-slovenia-2015" / name, slo / name)

s2 = out / "s2-29RKH"
s2.mkdir(parents=True, exist_ok=True)
window = Window(150, 150, 256, 256)
for src_path, name in (
    (
        shared / "s2-l2a-29RKH-2020-02-19" / "S2A_29RKH_20200219_L2A_12band_200m.tif",
        "S2A_29RKH_20200219_L2A_12band_200m_crop.tif",
    ),
    (
        shared / "s2-l2a-29RKH-2020-02-19" / "original" / "SCL.tif",
        "S2A_29RKH_20200219_SCL_crop.tif",
    ),
):
    with rasterio.open(src_path) as src:
        profile = src.profile | {
            "width": 256,
            "height": 256,
            "transform": src.window_transform(window),
            "compress": "deflate",
            "tiled": True,
            "blockxsize": 128,
            "blockysize": 128,
        }
        profile.pop("photometric", None)
        with rasterio.open(s2 / name, "w", **profile) as dst:
            dst.write(src.read(window=window))
            dst.descriptions = src.descriptions
            dst.update_tags(**src.tags())
print(f"sample written to {out}")
