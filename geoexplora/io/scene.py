"""Scenes: raster files -> one lazily read ``(time, band, y, x)`` stack on one grid.

A scene can be one multi-band file, one file per band (at several resolutions: resampled to the
finest, or to ``resolution``), or one file per date (aligned on the first date's grid; a file on
another grid is reprojected, with a warning). Values come back in canonical units (reflectance x
10 000, float32) with NaN for nodata; see ``geoexplora.bands`` for the conversion rules.

Band identity of a file comes from, in this order: ``band_map``, the file's band descriptions,
a band token in the file name (``_B04.tif``), or a sensor preset whose band count matches.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geoexplora import bands as B
from geoexplora.errors import UserError, opt
from geoexplora.io.remote import as_path, is_uri, read_error

log = logging.getLogger("geoexplora")

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")

# Band counts of common whole-sensor stacks (files with no descriptions, given --sensor).
SENSOR_LAYOUTS: dict[tuple[str, int], tuple[str, ...]] = {
    ("sentinel2", 13): (
        "B1",
        "B2",
        "B3",
        "B4",
        "B5",
        "B6",
        "B7",
        "B8",
        "B8A",
        "B9",
        "B10",
        "B11",
        "B12",
    ),
    ("sentinel2", 12): ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
    ("sentinel2", 10): ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"),
    ("sentinel2", 4): ("B2", "B3", "B4", "B8"),
    ("landsat8", 7): ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
    ("landsat9", 7): ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
    ("landsat7", 6): ("B1", "B2", "B3", "B4", "B5", "B7"),
    ("landsat5", 6): ("B1", "B2", "B3", "B4", "B5", "B7"),
    ("landsat4", 6): ("B1", "B2", "B3", "B4", "B5", "B7"),
    ("rgb", 3): ("red", "green", "blue"),
    ("rgbn", 4): ("red", "green", "blue", "nir"),
}

# Product-ID prefixes that name the sensor (Landsat Collection and Sentinel-2 naming).
_SENSOR_PREFIXES = (
    (re.compile(r"(^|[_/])(LC08|LO08)_"), "landsat8"),
    (re.compile(r"(^|[_/])(LC09|LO09)_"), "landsat9"),
    (re.compile(r"(^|[_/])LE07_"), "landsat7"),
    (re.compile(r"(^|[_/])LT05_"), "landsat5"),
    (re.compile(r"(^|[_/])LT04_"), "landsat4"),
    (re.compile(r"(^|[_/])S2[ABCD]_"), "sentinel2"),
)
_BAND_TOKEN = re.compile(r"(?:^|[_\-.])(B0?\d{1,2}A?)(?=$|[_\-.])", re.IGNORECASE)
_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?:T\d{2,6})?(?!\d)"),
)
_DATE_TAGS = (
    "ACQUISITION",
    "ACQUISITION_DATE",
    "ACQUISITIONDATE",
    "DATE_ACQUIRED",
    "SENSING_TIME",
    "DATETIME",
    "DATE",
    "TIFFTAG_DATETIME",
)


@dataclass
class SceneOptions:
    """How to read scenes; mirrors the CLI's shared options."""

    bands: list[str] | None = None
    sensor: str | None = None
    band_map: dict[str, str] | None = None  # "1" or "stem:1" -> band name
    resolution: float | None = None
    nodata: float | None = None
    dates: list[str] | None = None
    s2_offset: str = "auto"
    crs: str | None = None
    landsat_c2: bool | None = None  # None: detect from the product name (_L2SP_ ... _SR_B)


@dataclass
class SourceBand:
    """One band of one file, with what it is and how to turn its DNs into canonical units."""

    path: Path
    index: int  # 1-based, as in GDAL
    band: B.Band
    date: str | None
    scale: float = 1.0
    add: float = 0.0
    nodata: float | None = None


@dataclass
class RasterFile:
    """What one file holds, before scenes are assembled."""

    path: Path
    count: int
    width: int
    height: int
    crs: CRS
    transform: Affine
    dtype: str
    nodata: float | None
    date: str | None
    sensor: str | None
    bands: list[B.Band | None]
    descriptions: list[str | None]
    tags: dict = field(default_factory=dict)
    tokens: list[str | None] = field(default_factory=list)  # band names found, before the sensor

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)


def parse_date(text: str | None) -> str | None:
    """First date (YYYY-MM-DD or YYYYMMDD, optionally with a time) in ``text`` as ISO, or None."""
    if not text:
        return None
    for pattern in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            y, mo, d = (int(g) for g in m.groups())
            if 1970 <= y <= 2100 and 1 <= mo <= 12 and 1 <= d <= 31:
                return f"{y:04d}-{mo:02d}-{d:02d}"
    return None


def parse_dates_option(text: str | None) -> list[str] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        date = parse_date(item.strip())
        if date is None:
            raise UserError(f"{opt('dates')} entry '{item}' is not a date (YYYY-MM-DD)")
        out.append(date)
    return out


def sensor_from_name(path: Path) -> str | None:
    for pattern, sensor in _SENSOR_PREFIXES:
        if pattern.search(path.name):
            return sensor
    return None


def band_token_from_name(path: Path) -> str | None:
    """``S2A_..._B04.tif`` -> ``B04``; ``B8A.tif`` -> ``B8A``; None if no single token."""
    tokens = _BAND_TOKEN.findall(path.stem)
    return tokens[-1] if tokens else None


def guess_sensor(tokens: list[str]) -> str | None:
    """The one sensor family under which all tokens are distinct bands, or None if several/none.

    Sentinel-2 and Landsat share names (B2..B9) that mean different wavelengths, so a file whose
    band names fit both is ambiguous and needs ``--sensor``.
    """
    families = {"sentinel2": "sentinel2", "landsat8": "landsat8", "landsat7": "landsat7"}
    fits = []
    for sensor in families:
        found = _find_all(sensor, tokens)
        if found is not None and len({b.name for b in found}) == len(found):
            fits.append(sensor)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        for sensor in ("rgb", "rgbn"):
            found = _find_all(sensor, tokens)
            if found is not None and len({b.name for b in found}) == len(found):
                return sensor
    return None


def _find_all(sensor: str, tokens: list[str]) -> list[B.Band] | None:
    """Each token's band of ``sensor``; None when a token names no band of it."""
    found = [B.find_band(sensor, t) for t in tokens]
    bands = [b for b in found if b is not None]
    return bands if len(bands) == len(found) else None


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders -> their raster files (per-band folders: only band files)."""
    out: list[Path] = []
    for raw in paths:
        p = as_path(raw)  # a URI stays one (RemotePath)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in RASTER_SUFFIXES
            )
            band_files = [f for f in files if band_token_from_name(f)]
            chosen = band_files or files
            if not chosen:
                raise UserError(f"{p}: folder holds no raster files ({', '.join(RASTER_SUFFIXES)})")
            skipped = sorted(set(files) - set(chosen))
            if skipped:
                log.debug("%s: not band files, ignored: %s", p, ", ".join(f.name for f in skipped))
            out.extend(chosen)
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not out:
        raise UserError("no input rasters given")
    return out


def _band_map_for(path: Path, band_map: dict[str, str] | None, count: int) -> dict[int, str]:
    if not band_map:
        return {}
    out = {}
    for key, name in band_map.items():
        stem, sep, idx = key.rpartition(":")
        if sep and stem != path.stem and stem != path.name:
            continue
        i = int(idx)
        if not 1 <= i <= count:
            raise UserError(f"{opt('band_map')} {key}={name}: {path} has {count} band(s)")
        out[i] = name
    return out


def open_georeferenced(path):
    """``rasterio.open(path)`` for a reader that needs a georeferenced raster; a one-line error
    naming the file when it cannot be opened (for a URI: the cause) or has no CRS."""
    try:  # rasterio's NotGeoreferencedWarning goes to the logger (-v), next to our error
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        if is_uri(path):  # the URI and why: unreachable, 403/404, no range requests
            raise read_error(path, exc) from exc
        raise UserError(f"{path}: not a readable raster ({str(exc).splitlines()[0]})") from exc
    if src.crs is None:
        src.close()
        raise UserError(
            f"{path}: has no CRS; assign the one it was made in first "
            f"(gdal_edit.py -a_srs EPSG:<code> {Path(str(path)).name})"
        )
    return src


def inspect_raster(path: Path, opts: SceneOptions, sensor: str | None = None) -> RasterFile:
    """Open one file and identify its bands (None where unknown); UserError if unreadable."""
    with open_georeferenced(path) as src:
        info = {
            "count": src.count,
            "width": src.width,
            "height": src.height,
            "crs": src.crs,
            "transform": src.transform,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "descriptions": list(src.descriptions),
            "tags": src.tags(),
        }
    if info["transform"] == Affine.identity():
        raise UserError(f"{path}: has no georeferencing (identity transform)")

    sensor = (B.canonical_sensor(opts.sensor) if opts.sensor else sensor) or sensor_from_name(path)
    tokens: list[str | None] = [None] * info["count"]
    explicit = _band_map_for(path, opts.band_map, info["count"])
    if explicit:
        if all(info["descriptions"]):  # a partial map overrides only the bands it names
            tokens = list(info["descriptions"])
        for i, name in explicit.items():
            named_sensor, sep, band_name = name.rpartition(":")
            if sep:  # sensor-qualified: 1=sentinel2:B2
                named_sensor = B.canonical_sensor(named_sensor)
                if sensor not in (None, named_sensor):
                    raise UserError(
                        f"{opt('band_map')} {i}={name}: {path.name} is {sensor} "
                        f"(from {opt('sensor')} or its name), not {named_sensor}"
                    )
                sensor, name = named_sensor, band_name
            tokens[i - 1] = name
    elif all(info["descriptions"]) and info["count"] > 0:
        tokens = list(info["descriptions"])
    elif info["count"] == 1 and band_token_from_name(path):
        tokens = [band_token_from_name(path)]
    elif sensor and (sensor, info["count"]) in SENSOR_LAYOUTS:
        tokens = list(SENSOR_LAYOUTS[(sensor, info["count"])])

    stac = getattr(path, "stac", None)  # a STAC band asset: the item names its band
    if stac is not None and info["count"] == 1 and not explicit:
        sensor, tokens = stac.sensor, [stac.band.name]
    known = [t for t in tokens if t]
    if sensor is None and known:
        sensor = guess_sensor(known)
    if sensor is None and explicit:
        unknown = [n for n in explicit.values() if not any(B.find_band(s, n) for s in B.SENSORS)]
        if unknown:
            raise UserError(
                f"{opt('band_map')} names {', '.join(unknown)}: not a band of any sensor "
                f"({path.name})"
            )
        raise UserError(
            f"{opt('band_map')} {', '.join(f'{i}={n}' for i, n in explicit.items())}: "
            f"these names fit several sensors ({path.name}); pass {opt('sensor')}, or "
            "qualify them (1=sentinel2:B2)"
        )
    identified: list[B.Band | None] = []
    for t in tokens:
        if t is None or sensor is None:
            identified.append(None)
            continue
        band = B.find_band(sensor, t)
        if band is None and explicit:
            raise UserError(f"{opt('band_map')} names '{t}', which is not a {sensor} band")
        identified.append(band)
    date = None
    for tag in _DATE_TAGS:
        if tag in info["tags"]:
            date = parse_date(info["tags"][tag])
            if date:
                break
    date = (
        (stac.date if stac else None)
        or date
        or parse_date(path.name)
        or parse_date(path.parent.name)
    )
    return RasterFile(path=path, date=date, sensor=sensor, bands=identified, tokens=tokens, **info)


def _refuse_preset_mismatch(path: Path, sensor: str, count: int) -> None:
    """``--sensor`` names a file's bands only for a stack of the preset's size: say what the
    preset describes and how to name the bands of this file instead."""
    sizes = sorted(c for s, c in SENSOR_LAYOUTS if s == sensor)
    common = ["blue", "green", "red", "nir"]
    named = _find_all(sensor, common[:count]) if count <= len(common) else None
    if named is not None:
        example = ",".join(f"{i}={b.name}" for i, b in enumerate(named, start=1))
    else:
        example = "1=B1,2=B2,..."
    stacks = " or ".join(f"{n}-band" for n in sizes) or "no"
    raise UserError(
        f"{opt('sensor')} {sensor}: the preset describes a {stacks} stack, {path.name} "
        f"has {count} band(s) without descriptions; name them with {opt('band_map')} "
        f"{example}"
    )


def _s2_offset(rf: RasterFile, opts: SceneOptions) -> float:
    if opts.s2_offset in ("0", "1000"):
        return float(opts.s2_offset)
    if opts.s2_offset != "auto":
        raise UserError(f"{opt('s2_offset')} must be auto, 0 or 1000, not '{opts.s2_offset}'")
    for tag in ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET"):
        if tag in rf.tags:
            return abs(float(rf.tags[tag]))
    if rf.date and rf.date >= B.S2_OFFSET_FROM:
        return float(B.S2_OFFSET_DN)
    return 0.0


def _is_unit_reflectance(rf: RasterFile, index: int) -> bool:
    """A float band whose values sit in 0..~1.5 holds reflectance as a fraction."""
    if not rf.dtype.startswith("float"):
        return False
    with rasterio.open(rf.path) as src:
        step = max(1, max(src.width, src.height) // 256)
        sample = src.read(
            index,
            out_shape=(max(1, src.height // step), max(1, src.width // step)),
            resampling=Resampling.nearest,
        ).astype("float64")
    valid = sample[np.isfinite(sample)]
    if rf.nodata is not None:
        valid = valid[valid != rf.nodata]
    return valid.size > 0 and float(np.percentile(valid, 99)) < 2.0


def conversion_for(rf: RasterFile, index: int, opts: SceneOptions) -> tuple[float, float]:
    """(scale, add) so that canonical = raw * scale + add (see the module docs of bands.py)."""
    band = rf.bands[index - 1]
    stac = getattr(rf.path, "stac", None)  # a STAC item's raster:bands / offset properties
    declared = stac.conversion(opts.s2_offset) if stac is not None and rf.count == 1 else None
    if declared is not None:
        return declared
    c2 = opts.landsat_c2
    if c2 is None:
        c2 = "_L2SP_" in rf.path.name.upper() and "_SR_B" in rf.path.name.upper()
    if c2 and band is not None and band.sensor.startswith("landsat"):
        return B.LANDSAT_C2_SCALE * 1e4, B.LANDSAT_C2_OFFSET * 1e4
    if band is not None and band.sensor in ("rgb", "rgbn"):
        return 1.0, 0.0
    if _is_unit_reflectance(rf, index):
        return 1e4, 0.0
    if band is not None and band.sensor == "sentinel2" and not rf.dtype.startswith("float"):
        return 1.0, -_s2_offset(rf, opts)
    return 1.0, 0.0


def crs_equivalent(a: CRS, b: CRS) -> bool:
    """Same CRS, or the same projection on two realisations of one datum (EPSG:32119 vs 3358)."""
    if a == b:
        return True
    from pyproj import CRS as PCRS

    pa, pb = PCRS.from_user_input(a.to_wkt()), PCRS.from_user_input(b.to_wkt())
    if pa.equals(pb, ignore_axis_order=True):
        return True
    if not (pa.is_projected and pb.is_projected):
        return False
    ca, cb = pa.coordinate_operation, pb.coordinate_operation
    if ca is None or cb is None or ca.method_name != cb.method_name:
        return False
    # pyproj's stub types Param.value as str; numeric parameters are floats at run time.
    va = [round(p.value, 6) for p in ca.params]  # type: ignore[call-overload]
    vb = [round(p.value, 6) for p in cb.params]  # type: ignore[call-overload]
    return va == vb and pa.ellipsoid == pb.ellipsoid


@dataclass
class Grid:
    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return west, south, east, north


def same_grid(rf: RasterFile, grid: Grid, tol: float = 1e-6) -> bool:
    return (
        rf.width == grid.width
        and rf.height == grid.height
        and rf.transform.almost_equals(grid.transform, precision=tol * max(grid.res))
        and crs_equivalent(rf.crs, grid.crs)
    )


class Scene:
    """A lazily read stack of ``T`` dates x ``C`` bands on one grid.

    ``read(window)`` returns float32 ``(T, C, h, w)`` in canonical units, NaN = nodata. Windows
    may reach past the raster (outside is NaN). Open file handles are kept per process so that
    DataLoader workers can share one Scene object.
    """

    def __init__(self, sources: list[list[SourceBand]], grid: Grid, dates: list[str | None]):
        self.sources = sources
        self.grid = grid
        self.dates = dates
        self.bands = [s.band for s in sources[0]]
        self._handles: dict = {}
        self._pid = os.getpid()
        # GDAL threads decoding the compressed blocks of one read (GTiff/COG), for files opened
        # from now on; None leaves GDAL's setting (GDAL_NUM_THREADS, default one thread), which
        # suits readers that run in parallel already, like DataLoader workers.
        self.decode_threads: int | None = None

    crs = property(lambda self: self.grid.crs)
    transform = property(lambda self: self.grid.transform)
    width = property(lambda self: self.grid.width)
    height = property(lambda self: self.grid.height)
    res = property(lambda self: self.grid.res)
    shape = property(lambda self: (len(self.dates), len(self.bands), self.height, self.width))

    @property
    def paths(self) -> list[Path]:
        return sorted({s.path for frame in self.sources for s in frame})

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _dataset(self, path: Path):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        ds = self._handles.get(path)
        if ds is None:
            if self.decode_threads is None:
                src = rasterio.open(path)
            else:
                with rasterio.Env(GDAL_NUM_THREADS=str(self.decode_threads)):  # read at open
                    src = rasterio.open(path)
            if same_grid(_inspect_grid(src), self.grid):
                ds = src
            else:
                ds = WarpedVRT(
                    src,
                    crs=self.grid.crs,
                    transform=self.grid.transform,
                    width=self.grid.width,
                    height=self.grid.height,
                    resampling=Resampling.bilinear,
                    dtype="float32",
                    src_nodata=src.nodata,
                    nodata=np.nan,
                )
            self._handles[path] = ds
        return ds

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ds in self._handles.values():
            ds.close()
        self._handles = {}

    def read(self, window: Window | None = None) -> np.ndarray:
        if window is None:
            window = Window(0, 0, self.width, self.height)
        col, row = int(window.col_off), int(window.row_off)
        w, h = int(window.width), int(window.height)
        shape = (len(self.dates), len(self.bands), h, w)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + w, self.width), min(row + h, self.height)
        inside = (c0, r0, c1, r1) == (col, row, col + w, row + h)
        out = np.empty(shape, np.float32) if inside else np.full(shape, np.nan, np.float32)
        if c1 <= c0 or r1 <= r0:
            return out
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        for t, frame in enumerate(self.sources):
            by_file: dict[Path, list[int]] = {}
            for c, sb in enumerate(frame):
                by_file.setdefault(sb.path, []).append(c)
            for path, channels in by_file.items():
                ds = self._dataset(path)
                indexes = [frame[c].index for c in channels]
                # One read per file: pixel-interleaved files decode each block once for all
                # bands; GDAL converts to float32 while reading (into ``out`` itself when the
                # window is inside the scene and the file's bands are consecutive channels), the
                # rest works in place.
                if inside and channels == list(range(channels[0], channels[-1] + 1)):
                    stack = out[t, channels[0] : channels[-1] + 1]
                    ds.read(indexes, window=inner, out=stack)
                else:
                    stack = ds.read(indexes, window=inner, out_dtype="float32")
                for values, c in zip(stack, channels):
                    self._to_canonical(values, frame[c], ds)
                    if not np.shares_memory(values, out):
                        out[t, c, r0 - row : r1 - row, c0 - col : c1 - col] = values
        return out

    @staticmethod
    def _to_canonical(values: np.ndarray, sb: SourceBand, ds) -> None:
        """In place: nodata and infinities -> NaN, DNs -> canonical units."""
        if sb.nodata is not None and not np.isnan(sb.nodata):
            values[values == np.float32(sb.nodata)] = np.nan
        if ds.dtypes[sb.index - 1].startswith("float"):
            values[np.isinf(values)] = np.nan  # NaN is nodata already
        if sb.scale != 1.0:
            values *= np.float32(sb.scale)
        if sb.add != 0.0:
            values += np.float32(sb.add)

    def valid_mask(self, data: np.ndarray) -> np.ndarray:
        """``(h, w)`` True where some date has all bands valid."""
        return np.isfinite(data).all(axis=1).any(axis=0)

    def to_dataarray(self):
        """The scene as a lazy ``xarray.DataArray`` (time, band, y, x) with rio CRS/transform."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr
        from xarray.core import indexing

        from geoexplora.io._xarray_backend import SceneBackendArray

        t = self.transform
        xs = t.c + t.a * (np.arange(self.width) + 0.5)
        ys = t.f + t.e * (np.arange(self.height) + 0.5)
        lazy = indexing.LazilyIndexedArray(SceneBackendArray(self))
        times = np.array([d or "NaT" for d in self.dates], dtype="datetime64[ns]")
        da = xr.DataArray(
            lazy,
            dims=("time", "band", "y", "x"),
            coords={"time": times, "band": [b.name for b in self.bands], "y": ys, "x": xs},
            attrs={"units": "reflectance_x10000", "band_keys": [b.key for b in self.bands]},
        )
        da = da.rio.write_crs(self.crs).rio.write_transform(self.transform)
        return da

    def describe(self) -> dict:
        return {
            "paths": [str(p) for p in self.paths],
            "width": self.width,
            "height": self.height,
            "crs": self.crs.to_string(),
            "transform": list(self.transform)[:6],
            "resolution": list(self.res),
            "dates": self.dates,
            "bands": [{**b.to_dict(), "key": b.key} for b in self.bands],
            "units": "reflectance_x10000",
        }


def _inspect_grid(src) -> RasterFile:
    return RasterFile(
        path=as_path(src.name),
        count=src.count,
        width=src.width,
        height=src.height,
        crs=src.crs,
        transform=src.transform,
        dtype=src.dtypes[0],
        nodata=src.nodata,
        date=None,
        sensor=None,
        bands=[],
        descriptions=[],
    )


def _target_grid(reference: RasterFile, opts: SceneOptions) -> Grid:
    crs = CRS.from_user_input(opts.crs) if opts.crs else reference.crs
    grid = Grid(reference.crs, reference.transform, reference.width, reference.height)
    if crs != reference.crs and not crs_equivalent(crs, reference.crs):
        from rasterio.warp import calculate_default_transform

        transform, width, height = calculate_default_transform(
            reference.crs,
            crs,
            reference.width,
            reference.height,
            *grid.bounds,
            resolution=opts.resolution,
        )
        return Grid(crs, transform, width, height)
    if opts.resolution:
        west, south, east, north = grid.bounds
        width = max(1, round((east - west) / opts.resolution))
        height = max(1, round((north - south) / opts.resolution))
        return Grid(
            grid.crs, Affine(opts.resolution, 0, west, 0, -opts.resolution, north), width, height
        )
    return grid


def _describe_bands(files: list[RasterFile]) -> str:
    names = []
    for rf in files:
        for i, b in enumerate(rf.bands, start=1):
            names.append(f"{rf.path.name}#{i}={b.name if b else '?'}")
    return ", ".join(names)


def open_scene(paths: list[str | os.PathLike], opts: SceneOptions | None = None) -> Scene:
    """Open files/folders of one place as a Scene; UserError on anything ambiguous or missing."""
    opts = opts or SceneOptions()
    files_paths = expand_inputs(paths)
    files = [inspect_raster(p, opts) for p in files_paths]
    # A sensor told by one file (name prefix, descriptions) applies to its siblings.
    sensors = {rf.sensor for rf in files if rf.sensor}
    if not opts.sensor and len(sensors) == 1 and any(rf.sensor is None for rf in files):
        files = [inspect_raster(p, opts, sensor=next(iter(sensors))) for p in files_paths]

    if opts.dates:
        if len(opts.dates) != len(files):
            raise UserError(f"{opt('dates')} has {len(opts.dates)} dates for {len(files)} files")
        for rf, d in zip(files, opts.dates):
            rf.date = d
    dated = {rf.date for rf in files}
    if None in dated and len(dated) > 1:
        undated = [rf.path.name for rf in files if rf.date is None]
        raise UserError(
            f"cannot tell the date of {', '.join(undated)} while other files have "
            f"dates; pass {opt('dates')}, or leave out files that are not images of the scene "
            f"(a class raster is {opt('label_raster')}; masks and indices are not inputs)"
        )
    groups: dict[str | None, list[RasterFile]] = {}
    for rf in files:
        groups.setdefault(rf.date, []).append(rf)
    dates = sorted(groups, key=lambda d: d or "")

    first = groups[dates[0]]
    if opts.bands:
        wanted_tokens = list(opts.bands)
    else:
        unknown = [rf.path.name for rf in first if any(b is None for b in rf.bands)]
        named = [rf for rf in first if rf.sensor is None and all(rf.tokens)]
        if named:
            found = [t for t in named[0].tokens if t is not None]  # all of them (``all`` above)
            raise UserError(
                f"{named[0].path.name}: band names {', '.join(found)} fit several sensors "
                f"(Sentinel-2 and Landsat number bands differently); pass {opt('sensor')}"
            )
        blank = [rf for rf in first if not any(rf.tokens)]
        if opts.sensor and blank:  # the preset did not fit the file's band count
            _refuse_preset_mismatch(blank[0].path, B.canonical_sensor(opts.sensor), blank[0].count)
        if unknown:
            raise UserError(
                f"cannot tell which bands {', '.join(unknown)} hold(s) (no band descriptions, no "
                f"band token in the name); pass {opt('sensor')} for a full stack, or {opt('band_map')} 1=B2,..."
            )
        # Every band of the first date is identified here (``unknown`` is empty).
        identified = [b for rf in first for b in rf.bands if b is not None]
        wanted_tokens = [b.name for b in identified]
        if len(first) > 1:  # one file per band: registry (wavelength-table) order, not file order
            order = {b.name: i for i, b in enumerate(B.SENSORS[identified[0].sensor])}
            wanted_tokens.sort(key=lambda name: order.get(name, len(order)))
    sources: list[list[SourceBand]] = []
    for date in dates:
        group = groups[date]
        available = [(rf, i + 1, b) for rf in group for i, b in enumerate(rf.bands) if b]
        frame = []
        for token in wanted_tokens:
            matches = []
            for rf, idx, band in available:
                if B.find_band(band.sensor, token) == band:
                    matches.append((rf, idx, band))
            if not matches:
                unknown = [rf.path.name for rf in group if any(b is None for b in rf.bands)]
                hint = (
                    f"; unidentified bands in {', '.join(unknown)}: pass --band-map or --sensor"
                    if unknown
                    else ""
                )
                raise UserError(
                    f"band {token} not found in {', '.join(rf.path.name for rf in group)}"
                    f" (has: {_describe_bands(group)}){hint}"
                )
            if len({m[2].key for m in matches}) > 1 or len(matches) > 1:
                where = ", ".join(f"{m[0].path.name}#{m[1]} ({m[2].key})" for m in matches)
                if len({m[2].key for m in matches}) == 1:  # one band twice: --sensor cannot help
                    if len({m[0].path for m in matches}) > 1:
                        raise UserError(
                            f"band {token} appears {len(matches)} times: {where}; "
                            "give one file per band and date"
                        )
                    raise UserError(
                        f"band {token} appears {len(matches)} times: {where}; say "
                        f"which band each one is with {opt('band_map')} (e.g. {opt('band_map')} "
                        "1=B2,2=B3,...)"
                    )
                raise UserError(
                    f"band {token} is ambiguous: {where}; pass {opt('sensor')} or {opt('band_map')}"
                )
            rf, idx, band = matches[0]
            scale, add = conversion_for(rf, idx, opts)
            nodata = opts.nodata if opts.nodata is not None else rf.nodata
            frame.append(SourceBand(rf.path, idx, band, date, scale, add, nodata))
        sources.append(frame)
    B.check_distinct(wanted_tokens, [s.band for s in sources[0]])

    involved = {s.path for frame in sources for s in frame}
    first_files = [rf for rf in groups[dates[0]] if rf.path in involved]
    reference = min(first_files, key=lambda rf: rf.res[0] * rf.res[1])
    grid = _target_grid(reference, opts)
    for rf in files:
        if rf.path in involved and not crs_equivalent(rf.crs, grid.crs):
            log.warning(
                "%s: reprojecting from %s to %s",
                rf.path.name,
                rf.crs.to_string(),
                grid.crs.to_string(),
            )
        elif (
            rf.path in involved
            and rf.res != grid.res
            and not same_grid(rf, grid)
            and rf.date != dates[0]
            and len(dates) > 1
        ):
            log.warning("%s: on another grid than the first date; resampled onto it", rf.path.name)
    return Scene(sources, grid, list(dates))


def scene_options(
    bands=None,
    sensor=None,
    band_map=None,
    resolution=None,
    nodata=None,
    dates=None,
    s2_offset="auto",
    crs=None,
) -> SceneOptions:
    """SceneOptions from the CLI's string options."""
    from geoexplora.validate import require_positive

    require_positive("--resolution", resolution)
    if crs:
        from rasterio.errors import CRSError

        try:
            CRS.from_user_input(crs)
        except CRSError as exc:
            raise UserError(
                f"{opt('crs')} {crs}: not a coordinate reference system PROJ knows "
                "(e.g. EPSG:32633)"
            ) from exc
    bm = None
    if band_map:
        bm = {}
        for item in band_map.split(","):
            key, eq, name = item.partition("=")
            idx = key.rpartition(":")[2]
            if not eq or not idx.strip().isdigit() or not name.strip():
                raise UserError(
                    f"{opt('band_map')} entry '{item}' is not INDEX=BAND or FILE:INDEX=BAND "
                    "(e.g. 1=B2)"
                )
            bm[key.strip()] = name.strip()
    return SceneOptions(
        bands=B.parse_band_list(bands),
        sensor=sensor,
        band_map=bm,
        resolution=resolution,
        nodata=nodata,
        dates=parse_dates_option(dates),
        s2_offset=s2_offset,
        crs=crs,
    )
