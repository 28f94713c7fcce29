"""Writing prediction rasters in bounded memory: strips -> work folder -> Cloud-Optimised GeoTIFF.

Finished rows are buffered into strips of ``STRIP_ROWS`` output rows; each strip is written as a
small compressed GeoTIFF in a work folder next to the output (atomically: a strip file that
exists is complete). That makes interrupted runs resumable and lets shards (processes or machines
sharing a folder) write disjoint strips of one raster. When every strip exists, a VRT mosaic of
them carries the output's metadata (CRS, transform, nodata, colour table, class names, band
descriptions, scales) and GDAL's COG driver copies it into the final file, building overviews
(mode for classes, average for continuous values) in GDAL's bounded block cache.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np

from geoexplora.errors import UserError
from geoexplora.io.chips import class_color
from geoexplora.io.outputs import disk_full_as_oserror

if TYPE_CHECKING:
    from affine import Affine
    from rasterio.crs import CRS

STRIP_ROWS = 256
COG_DEFAULTS = {
    "COMPRESS": "DEFLATE",
    "BLOCKSIZE": "512",
    "BIGTIFF": "IF_SAFER",
    "NUM_THREADS": "ALL_CPUS",
}
_GDAL_TYPES = {
    "uint8": "Byte",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float16": "Float32",
    "float64": "Float64",
}


def class_dtype(num_classes: int) -> tuple[str, int]:
    """Smallest unsigned dtype holding class ids 0..K-1 plus a nodata value (its maximum)."""
    if num_classes <= 255:
        return "uint8", 255
    if num_classes <= 65535:
        return "uint16", 65535
    return "uint32", 2**32 - 1


def hex_to_rgba(color: str) -> tuple[int, int, int, int]:
    c = color.lstrip("#")
    if len(c) not in (6, 8) or any(ch not in "0123456789abcdefABCDEF" for ch in c):
        raise UserError(f"class colour '{color}' is not #rrggbb")
    ch = [int(c[i : i + 2], 16) for i in range(0, len(c), 2)]
    return ch[0], ch[1], ch[2], ch[3] if len(ch) == 4 else 255


def class_colormap(classes: list[dict]) -> dict[int, tuple[int, int, int, int]]:
    """``{id: rgba}`` from ``[{id, name, color}]``; classes without a colour get the palette's."""
    out = {}
    for i, c in enumerate(classes):
        out[int(c["id"])] = hex_to_rgba(c.get("color") or class_color(i))
    return out


@dataclass
class RasterSpec:
    """What one output raster is: grid, bands, dtype, nodata and the metadata it carries."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: list[str]
    resampling: str = "average"  # overview resampling: "mode" for classes
    colormap: dict[int, tuple] | None = None  # class names go in ``tags`` (embedded in the
    # file; GDAL keeps category names in a side .aux.xml only)
    scale: float | None = None
    tags: dict = field(default_factory=dict)

    @property
    def store_dtype(self) -> str:
        """float16 is stored as float32 in the strips (GeoTIFF support for Float16 varies)."""
        return "float32" if self.dtype == "float16" else self.dtype


class StripStore:
    """The strips of one output raster in ``folder``: ``rows_AAAAAAAA_BBBBBBBB.tif``."""

    def __init__(self, folder: Path, spec: RasterSpec, strip_rows: int = STRIP_ROWS):
        self.folder, self.spec, self.strip_rows = Path(folder), spec, strip_rows
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer: np.ndarray | None = None
        self._buffer_row = 0
        self._filled = 0

    @property
    def strip_count(self) -> int:
        return math.ceil(self.spec.height / self.strip_rows)

    def strip_rows_of(self, i: int) -> tuple[int, int]:
        return i * self.strip_rows, min((i + 1) * self.strip_rows, self.spec.height)

    def strip_path(self, i: int) -> Path:
        a, b = self.strip_rows_of(i)
        return self.folder / f"rows_{a:08d}_{b:08d}.tif"

    def done(self) -> set[int]:
        return {i for i in range(self.strip_count) if self.strip_path(i).exists()}

    def write(self, row: int, block: np.ndarray) -> None:
        """Append rows ``[row, row + n)`` (``block``: ``(count, n, width)``); rows arrive in
        order within one run, starting at a strip boundary. Full strips go to disk."""
        n = block.shape[1]
        while n:
            if self._buffer is None:
                if row % self.strip_rows:
                    raise ValueError(f"row {row} does not start a strip")
                i = row // self.strip_rows
                a, b = self.strip_rows_of(i)
                self._buffer = np.empty(
                    (self.spec.count, b - a, self.spec.width), dtype=self.spec.store_dtype
                )
                self._buffer_row, self._filled = a, 0
            if row != self._buffer_row + self._filled:
                raise ValueError(
                    f"rows out of order: got {row}, expected {self._buffer_row + self._filled}"
                )
            take = min(n, self._buffer.shape[1] - self._filled)
            self._buffer[:, self._filled : self._filled + take] = block[:, :take]
            self._filled += take
            row += take
            block = block[:, take:]
            n -= take
            if self._filled == self._buffer.shape[1]:
                self._write_strip(self._buffer_row // self.strip_rows, self._buffer)
                self._buffer = None

    def _write_strip(self, i: int, data: np.ndarray) -> None:
        import rasterio
        from rasterio.windows import Window
        from rasterio.windows import transform as window_transform

        s = self.spec
        a, b = self.strip_rows_of(i)
        final = self.strip_path(i)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
        profile = {
            "driver": "GTiff",
            "width": s.width,
            "height": b - a,
            "count": s.count,
            "dtype": s.store_dtype,
            "nodata": s.nodata,
            "crs": s.crs,
            "transform": window_transform(Window(0, a, s.width, b - a), s.transform),
            "compress": "zstd",
            "zstd_level": 1,
        }
        if s.width >= 256 and b - a >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        try:
            with disk_full_as_oserror(tmp, data.nbytes), rasterio.open(tmp, "w", **profile) as dst:
                dst.write(data)
                dst.update_tags(**strip_stats(data, s))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)

    def stats(self) -> dict:
        """Valid pixels (and, for class maps, pixels per class) summed over the strips written."""
        import rasterio

        valid = 0
        counts: dict[str, int] = {}
        for i in sorted(self.done()):
            with rasterio.open(self.strip_path(i)) as src:
                tags = src.tags()
            valid += int(tags["VALID_PIXELS"])
            for k, v in json.loads(tags.get("CLASS_COUNTS", "{}")).items():
                counts[k] = counts.get(k, 0) + v
        return {"valid_pixels": valid, **({"class_pixels": counts} if counts else {})}

    def assert_idle(self) -> None:
        """A run must end on a strip boundary (or the raster's end): nothing may be left."""
        if self._buffer is not None:
            raise RuntimeError(
                f"{self.folder}: strip at row {self._buffer_row} left incomplete "
                f"({self._filled} of {self._buffer.shape[1]} rows)"
            )

    def vrt_xml(self) -> str:
        """A VRT mosaic of all strips carrying the output's metadata."""
        s = self.spec
        t = s.transform
        gdal_type = _GDAL_TYPES[s.store_dtype]
        lines = [
            f'<VRTDataset rasterXSize="{s.width}" rasterYSize="{s.height}">',
            f"  <SRS>{escape(s.crs.to_wkt())}</SRS>",
            (
                f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}"
                "</GeoTransform>"
            ),
        ]
        if s.tags:
            lines.append("  <Metadata>")
            lines += [
                f'    <MDI key="{escape(str(k))}">{escape(str(v))}</MDI>' for k, v in s.tags.items()
            ]
            lines.append("  </Metadata>")
        for band in range(1, s.count + 1):
            lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
            lines.append(f"    <Description>{escape(s.descriptions[band - 1])}</Description>")
            if s.nodata is not None:
                nd = (
                    "nan"
                    if isinstance(s.nodata, float) and math.isnan(s.nodata)
                    else repr(s.nodata)
                )
                lines.append(f"    <NoDataValue>{nd}</NoDataValue>")
            if s.colormap and band == 1:
                lines.append("    <ColorInterp>Palette</ColorInterp>")
                lines.append("    <ColorTable>")
                for i in range(max(s.colormap) + 1):
                    r, g, b_, a = s.colormap.get(i, (0, 0, 0, 0))
                    lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b_}" c4="{a}"/>')
                lines.append("    </ColorTable>")
            if s.scale is not None:
                lines.append(f"    <Scale>{s.scale!r}</Scale>")
                lines.append("    <Offset>0</Offset>")
            for i in range(self.strip_count):
                a, b = self.strip_rows_of(i)
                lines += [
                    "    <SimpleSource>",
                    (
                        f'      <SourceFilename relativeToVRT="1">{escape(self.strip_path(i).name)}'
                        "</SourceFilename>"
                    ),
                    f"      <SourceBand>{band}</SourceBand>",
                    f'      <SrcRect xOff="0" yOff="0" xSize="{s.width}" ySize="{b - a}"/>',
                    f'      <DstRect xOff="0" yOff="{a}" xSize="{s.width}" ySize="{b - a}"/>',
                    "    </SimpleSource>",
                ]
            lines.append("  </VRTRasterBand>")
        lines.append("</VRTDataset>")
        return "\n".join(lines) + "\n"

    def assemble(self, target: Path, creation_options: dict[str, str] | None = None) -> None:
        """Copy the complete strip mosaic to ``target`` as a COG (``target`` is a temporary
        name; the caller renames it)."""
        import rasterio
        import rasterio.shutil

        missing = sorted(set(range(self.strip_count)) - self.done())
        if missing:
            raise RuntimeError(
                f"{self.folder}: {len(missing)} strip(s) missing, e.g. "
                f"{self.strip_path(missing[0]).name}"
            )
        vrt = self.folder / "mosaic.vrt"
        vrt.write_text(self.vrt_xml())
        options = {
            **COG_DEFAULTS,
            "OVERVIEW_RESAMPLING": "MODE" if self.spec.resampling == "mode" else "AVERAGE",
            "PREDICTOR": "YES" if self.spec.resampling != "mode" else "NO",
        }
        if self.spec.dtype == "float16":  # half floats: Float32 stored with 16 bits
            options.update(PREDICTOR="NO", NBITS="16")
        options.update(creation_options or {})
        strips = sum(self.strip_path(i).stat().st_size for i in range(self.strip_count))
        with (
            disk_full_as_oserror(target, strips),
            rasterio.Env(GDAL_CACHEMAX=256, GDAL_PAM_ENABLED="NO"),
            rasterio.open(vrt) as src,
        ):
            rasterio.shutil.copy(src, target, driver="COG", **options)


def strip_stats(data: np.ndarray, spec: RasterSpec) -> dict:
    """Tags of one strip: valid pixels (not nodata in band 1) and, for class maps, class counts."""
    band = data[0]
    if spec.nodata is None:
        valid = np.ones(band.shape, dtype=bool)
    elif isinstance(spec.nodata, float) and math.isnan(spec.nodata):
        valid = np.isfinite(band)
    else:
        valid = band != spec.nodata
    tags = {"VALID_PIXELS": str(int(valid.sum()))}
    if spec.colormap:
        counts = np.bincount(band[valid].ravel().astype(np.int64))
        tags["CLASS_COUNTS"] = json.dumps({str(k): int(c) for k, c in enumerate(counts) if c})
    return tags


def write_sidecar(path: Path, doc: dict) -> None:
    """The JSON provenance record next to an output (written atomically)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
