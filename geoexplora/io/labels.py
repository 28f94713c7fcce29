"""Label sources for ``tile``: vector layers and class rasters, read as per-window class-id masks.

Both kinds present the same interface: ``classes`` (stable ids 0..K-1, names, colours) and
``read_mask(grid, window) -> uint8 (h, w)`` with ``IGNORE_INDEX`` (255) where there is no label.
Ids are assigned in sorted order of the class names (vector) or values (raster), so the same
labels always give the same ids.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from geoexplora.errors import UserError, opt
from geoexplora.io.chips import IGNORE_INDEX, class_color, window_bounds, window_transform
from geoexplora.io.remote import as_path

if TYPE_CHECKING:
    from shapely.strtree import STRtree

log = logging.getLogger("geoexplora")

MAX_CLASSES = IGNORE_INDEX  # ids 0..254 fit a uint8 mask next to the ignore value
_NO_DATA_NAMES = {"nodata", "no_data", "no data", "none", "unlabeled", "unlabelled"}


@dataclass
class LabelClass:
    id: int
    name: str
    color: str
    value: int | None = None  # the class's value in a label raster

    def to_dict(self) -> dict:
        d = {"id": self.id, "name": self.name, "color": self.color}
        if self.value is not None:
            d["value"] = self.value
        return d


class VectorLabels:
    """Polygons or points with a class field, reprojected to the scenes' CRS, rasterised per window.

    Overlapping features: the later feature in the file wins. Points label the pixel they fall in.
    """

    def __init__(self, path: str | os.PathLike, field: str | None, crs, layer: str | None = None):
        import geopandas as gpd

        self.path = as_path(path)  # a URI stays one (RemotePath)
        try:
            gdf = gpd.read_file(self.path, layer=layer)
        except Exception as exc:  # pyogrio raises DataSourceError and friends
            if not self.path.exists():
                raise UserError(f"{opt('labels')} {self.path}: no such file") from exc
            raise UserError(
                f"{opt('labels')} {self.path}: not a readable vector file "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        fields = [c for c in gdf.columns if c != gdf.geometry.name]
        if not field:
            raise UserError(
                f"{opt('labels')} {self.path}: pass {opt('label_field')}, one of: "
                f"{', '.join(fields)}"
            )
        if field not in gdf.columns:
            raise UserError(
                f"{opt('label_field')} {field}: not a field of {self.path.name}; its fields "
                f"are: {', '.join(fields)}"
            )
        if gdf.crs is None:
            raise UserError(f"{opt('labels')} {self.path}: has no CRS")
        shaped = gdf.geometry.notna() & ~gdf.geometry.is_empty
        unnamed = int((shaped & gdf[field].isna()).sum())
        if unnamed:
            log.warning(
                "labels %s: %d of %d features have no '%s' value and are left out",
                self.path.name,
                unnamed,
                int(shaped.sum()),
                field,
            )
        gdf = gdf[shaped & gdf[field].notna()]
        if gdf.empty:
            raise UserError(
                f"{opt('labels')} {self.path}: no features with a geometry and a '{field}' value"
            )
        if not _same_crs(gdf.crs, crs):
            source_crs = gdf.crs.to_string()
            gdf = gdf.to_crs(crs.to_wkt())
            if not np.isfinite(gdf.total_bounds).all():
                raise UserError(
                    f"{opt('labels')} {self.path}: its coordinates do not fit its CRS "
                    f"{source_crs} (GeoJSON without a 'crs' member is lon/lat "
                    "WGS 84); give the file its real CRS"
                )
            log.warning(
                "labels %s: reprojected from %s to %s", self.path.name, source_crs, crs.to_string()
            )
        else:
            gdf = gdf.set_crs(crs.to_wkt(), allow_override=True)
        names = gdf[field].map(_class_name)
        ordered = sorted(set(names), key=natural_key)
        if len(ordered) > MAX_CLASSES:
            raise UserError(
                f"{opt('label_field')} {field}: {len(ordered)} classes, at most {MAX_CLASSES}"
            )
        self.classes = [LabelClass(i, n, class_color(i)) for i, n in enumerate(ordered)]
        ids = {c.name: c.id for c in self.classes}
        self.field = field
        self.geometries = gdf.geometry.reset_index(drop=True)
        self.ids = names.map(ids).to_numpy(dtype=np.uint8)
        types = set(self.geometries.geom_type)
        self.kind = "points" if types <= {"Point", "MultiPoint"} else "polygons"
        self._tree: STRtree | None = None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return tuple(self.geometries.total_bounds)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tree"] = None
        return state

    def read_mask(self, grid, window: Window) -> np.ndarray:
        from rasterio.features import rasterize
        from shapely import box
        from shapely.strtree import STRtree

        if self._tree is None:
            self._tree = STRtree(self.geometries.values)
        col, row = int(window.col_off), int(window.row_off)
        h, w = int(window.height), int(window.width)
        hits = np.sort(
            self._tree.query(
                box(*window_bounds(grid.transform, col, row, w, h)), predicate="intersects"
            )
        )
        if hits.size == 0:
            return np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        shapes = zip(self.geometries.values[hits], self.ids[hits].tolist())
        return rasterize(
            shapes,
            out_shape=(h, w),
            fill=IGNORE_INDEX,
            dtype="uint8",
            transform=window_transform(grid.transform, col, row),
        )


class RasterLabels:
    """A class raster (e.g. land cover), resampled to each scene grid with nearest neighbour.

    Class names come from a ``CLASSES`` tag (``"1=forest,2=water"``) when the file has one, else
    the values themselves; values named like "no data" and the file's nodata are no label.
    """

    def __init__(self, path: str | os.PathLike):
        import rasterio

        self.path = as_path(path)  # a URI stays one (RemotePath)
        try:
            with rasterio.open(self.path) as src:
                if src.crs is None:
                    raise UserError(f"{opt('label_raster')} {self.path}: has no CRS")
                self.crs, self.nodata = src.crs, src.nodata
                self.transform, self.width, self.height = src.transform, src.width, src.height
                self.bounds = tuple(src.bounds)
                names = _parse_classes_tag(src.tags().get("CLASSES", ""))
                values = self._scan_values(src)
                cmap = _colormap(src)
        except rasterio.errors.RasterioIOError as exc:
            raise UserError(
                f"{opt('label_raster')} {self.path}: not a readable raster "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        values = [v for v in values if names.get(v, "").lower() not in _NO_DATA_NAMES]
        if not values:
            raise UserError(
                f"{opt('label_raster')} {self.path}: holds no class values besides nodata"
            )
        if len(values) > MAX_CLASSES:
            raise UserError(
                f"{opt('label_raster')} {self.path}: {len(values)} distinct values, at most "
                f"{MAX_CLASSES} classes; is it a class raster?"
            )
        self.classes = [
            LabelClass(i, names.get(v, str(v)), cmap.get(v, class_color(i)), v)
            for i, v in enumerate(values)
        ]
        self.values = np.array(values, dtype=np.int64)
        self.kind = "raster"
        self._handles: dict = {}
        self._pid = os.getpid()

    def _scan_values(self, src) -> list[int]:
        """Distinct class values over the whole raster, block by block (bounded memory)."""
        found: set = set()
        for _, window in src.block_windows(1):
            data = src.read(1, window=window)
            valid = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
            if self.nodata is not None:
                valid &= data != self.nodata
            found.update(np.unique(data[valid]).tolist())
        ints = sorted(int(v) for v in found)
        if any(float(v) != float(i) for v, i in zip(sorted(found), ints)):
            raise UserError(
                f"{opt('label_raster')} {self.path}: holds non-integer values; a class "
                "raster is needed"
            )
        return ints

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _dataset(self, grid):
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        from geoexplora.io.scene import crs_equivalent

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        key = (grid.crs.to_wkt(), tuple(grid.transform), grid.width, grid.height)
        ds = self._handles.get(key)
        if ds is None:
            src = rasterio.open(self.path)
            same = (
                crs_equivalent(src.crs, grid.crs)
                and src.width == grid.width
                and src.height == grid.height
                and src.transform.almost_equals(grid.transform, precision=1e-6 * max(grid.res))
            )
            if same:
                ds = src
            else:
                if not crs_equivalent(src.crs, grid.crs):
                    log.info(
                        "label raster %s: reprojected from %s to %s (nearest)",
                        self.path.name,
                        src.crs.to_string(),
                        grid.crs.to_string(),
                    )
                ds = WarpedVRT(
                    src,
                    crs=grid.crs,
                    transform=grid.transform,
                    width=grid.width,
                    height=grid.height,
                    resampling=Resampling.nearest,
                    src_nodata=src.nodata,
                    nodata=src.nodata,
                )
            self._handles[key] = ds
        return ds

    def read_mask(self, grid, window: Window) -> np.ndarray:
        col, row = int(window.col_off), int(window.row_off)
        w, h = int(window.width), int(window.height)
        out = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + w, grid.width), min(row + h, grid.height)
        if c1 <= c0 or r1 <= r0:
            return out
        data = self._dataset(grid).read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        out[r0 - row : r1 - row, c0 - col : c1 - col] = self.to_ids(data)
        return out

    def to_ids(self, data: np.ndarray) -> np.ndarray:
        """Raster values -> class ids (255 for nodata and values that are no class)."""
        valid = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
        if self.nodata is not None:
            valid &= data != self.nodata
        values = np.where(valid, data, self.values[0]).astype(np.int64)
        pos = np.clip(np.searchsorted(self.values, values), 0, len(self.values) - 1)
        valid &= self.values[pos] == values
        return np.where(valid, pos, IGNORE_INDEX).astype(np.uint8)


def _same_crs(a, b) -> bool:
    from rasterio.crs import CRS

    from geoexplora.io.scene import crs_equivalent

    return crs_equivalent(
        CRS.from_user_input(a.to_wkt() if hasattr(a, "to_wkt") else a),
        CRS.from_user_input(b.to_wkt() if hasattr(b, "to_wkt") else b),
    )


def _class_name(value) -> str:
    """Field values as class names: 3 and 3.0 are both '3'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def natural_key(name: str):
    """Sort '2' before '10' and numbers before words."""
    return [
        (0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t
    ]


def _parse_classes_tag(text: str) -> dict[int, str]:
    out = {}
    for item in text.split(","):
        value, eq, name = item.partition("=")
        if eq and value.strip().lstrip("-").isdigit() and name.strip():
            out[int(value)] = name.strip()
    return out


def _colormap(src) -> dict[int, str]:
    try:
        cmap = src.colormap(1)
    except ValueError:  # no colour table
        return {}
    return {int(v): "#{:02x}{:02x}{:02x}".format(*rgba[:3]) for v, rgba in cmap.items()}


def open_labels(
    vector: str | os.PathLike | None,
    field: str | None,
    raster: str | os.PathLike | None,
    crs,
    layer: str | None = None,
):
    """The label source the options name (or None); both at once is a usage error."""
    if vector and raster:
        raise UserError(f"{opt('labels')} and {opt('label_raster')} are exclusive; pass one")
    if vector:
        return VectorLabels(vector, field, crs, layer)
    if raster:
        if field:
            raise UserError(
                f"{opt('label_field')} applies to {opt('labels')} (vector), not {opt('label_raster')}"
            )
        return RasterLabels(raster)
    if field:
        raise UserError(f"{opt('label_field')} needs {opt('labels')} PATH")
    return None
