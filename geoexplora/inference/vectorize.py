"""Class map -> polygons (class id, name, area), read strip by strip.

Polygons are traced per strip of rows (bounded memory); those touching a strip seam are merged
with their same-class neighbours across it afterwards, so a field cut by a seam comes out whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from geoexplora.io.outputs import atomic_output

VECTOR_STRIP_ROWS = 1024


def vectorize(classes_path: Path, target: Path, classes: list[dict], overwrite: bool) -> dict:
    import geopandas as gpd
    import numpy as np
    import rasterio
    from rasterio.features import shapes
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform
    from shapely.geometry import shape
    from shapely.ops import unary_union

    names = {int(c["id"]): str(c["name"]) for c in classes}
    whole, seam = [], {}
    with rasterio.open(classes_path) as src:
        nodata = src.nodata
        crs = src.crs
        for top in range(0, src.height, VECTOR_STRIP_ROWS):
            h = min(VECTOR_STRIP_ROWS, src.height - top)
            window = Window(0, top, src.width, h)
            data = src.read(1, window=window)
            mask = data != nodata
            if not mask.any():
                continue
            transform = window_transform(window, src.transform)
            for geom, value in shapes(data, mask=mask, transform=transform):
                poly = shape(geom)
                rows = poly.bounds  # (minx, miny, maxx, maxy) in CRS units
                _, row_min = ~src.transform * (rows[0], rows[3])
                _, row_max = ~src.transform * (rows[2], rows[1])
                touches = (round(row_min) == top and top > 0) or (
                    round(row_max) == top + h and top + h < src.height
                )
                if touches:
                    seam.setdefault(int(value), []).append(poly)
                else:
                    whole.append((int(value), poly))
    for value, polys in seam.items():
        merged = unary_union(polys)
        for part in getattr(merged, "geoms", [merged]):
            whole.append((value, part))
    gdf = gpd.GeoDataFrame(
        {
            "class": np.array([v for v, _ in whole], dtype="int32"),
            "name": [names.get(v, str(v)) for v, _ in whole],
        },
        geometry=[g for _, g in whole],
        crs=crs,
    )
    if crs is not None and crs.is_geographic and len(gdf):
        gdf["area"] = gdf.geometry.to_crs(gdf.estimate_utm_crs()).area
    else:
        gdf["area"] = gdf.geometry.area
    with atomic_output(target, overwrite) as tmp:
        named = tmp.with_name(tmp.name + ".gpkg")  # the GPKG driver wants its extension
        gdf.to_file(named, driver="GPKG", layer="predictions")
        os.replace(named, tmp)
    return {"path": str(target), "polygons": len(gdf)}
