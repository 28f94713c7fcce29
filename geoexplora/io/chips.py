"""The chips dataset: what ``tile`` writes and adapt/probe/finetune read.

Layout (see docs/architecture.md, "Chips dataset")::

    DIR/dataset.json     format_version, task, bands, num_frames, chip_size, units, stats,
                         classes, counts, provenance
    DIR/index.parquet    GeoParquet, one row per chip (footprint, window, dates, label, split)
    DIR/chips/ID.tif     float32 GeoTIFF, T*C bands date-major ("B2@2015-07-11"), nodata NaN
    DIR/masks/ID.tif     uint8 per-pixel class ids, 255 = no label (segmentation)
    DIR/stats_sample.npy float32 (N, C) pixel sample behind the statistics (``tile --append``
                         updates them from it)

Chips are plain GeoTIFFs so that QGIS and rio open them; ``dataset.json`` is written last, so a
folder without it is not a dataset.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from geoexplora import bands as B
from geoexplora.errors import UserError

FORMAT_VERSION = 1
UNITS = "reflectance_x10000"
TASKS = ("none", "classification", "multilabel", "segmentation")
IGNORE_INDEX = 255  # "no label" in masks
NO_LABEL = -1  # "no label" in the index's label column
META_NAME = "dataset.json"
INDEX_NAME = "index.parquet"
STATS_SAMPLE_NAME = "stats_sample.npy"
CHIPS_DIR = "chips"
MASKS_DIR = "masks"

# Distinct colours for classes without one of their own (ids cycle through them).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)


def class_color(class_id: int) -> str:
    return PALETTE[class_id % len(PALETTE)]


def window_transform(transform, col: float, row: float):
    """The transform of a window starting at ``(col, row)`` (affine's ``@``, not the deprecated
    ``*`` that rasterio.windows uses)."""
    from affine import Affine

    return transform @ Affine.translation(col, row)


def window_bounds(
    transform, col: float, row: float, width: float, height: float
) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` of a window of a north-up grid."""
    x0, y0 = transform @ (col, row)
    x1, y1 = transform @ (col + width, row + height)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def band_description(band: B.Band, date: str | None) -> str:
    """``B2@2015-07-11`` (or ``B2`` for an undated frame)."""
    return f"{band.name}@{date}" if date else band.name


def write_chip(
    path: Path,
    data: np.ndarray,
    transform,
    crs,
    bands: list[B.Band],
    dates: list[str | None],
    creation_options: dict | None = None,
) -> None:
    """Write a ``(T, C, H, W)`` float32 chip as a T*C-band GeoTIFF, date-major, NaN nodata."""
    t, c, h, w = data.shape
    descriptions = tuple(band_description(b, d) for d in dates for b in bands)
    tags = {"DATES": ";".join(d or "" for d in dates), "BAND_KEYS": ";".join(b.key for b in bands)}
    _writer(
        data.reshape(t * c, h, w),
        transform,
        crs,
        "float32",
        float("nan"),
        descriptions,
        tags,
        None,
        creation_options,
    ).write(path, data.reshape(t * c, h, w), transform)


def write_mask(
    path: Path,
    mask: np.ndarray,
    transform,
    crs,
    colors: dict[int, str] | None = None,
    creation_options: dict | None = None,
) -> None:
    """Write an ``(H, W)`` uint8 class-id mask (255 = no label), with a colour table."""
    cmap = tuple(sorted((i, _rgb(c)) for i, c in (colors or {}).items()))
    _writer(
        mask[None], transform, crs, "uint8", IGNORE_INDEX, (None,), {}, cmap, creation_options
    ).write(path, mask[None], transform)


class _TemplateWriter:
    """Writes same-layout GeoTIFFs by patching a template GDAL wrote once.

    Chips of one run differ only in their pixels and their origin, so the file GDAL writes for
    the first chip (uncompressed, band-interleaved strips) is reused: its strip bytes are replaced
    by the new pixels and its ModelTiepoint by the new origin. This removes GDAL's ~3 ms of
    per-file set-up, which dominates small chips; the bytes are those GDAL would write.
    """

    def __init__(self, template: bytes, strips: list[tuple[int, int]], tiepoint_offset: int):
        self.strips = strips
        self.tiepoint_offset = tiepoint_offset
        start, end = strips[0][0], strips[-1][0] + strips[-1][1]
        contiguous = all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(strips))
        # The common case: header, then every strip back to back, then the rest.
        self.span = (start, end) if contiguous and not start <= tiepoint_offset < end else None
        self.template = template

    def write(self, path: Path, data: np.ndarray, transform) -> None:
        import struct

        raw = np.ascontiguousarray(data).data.cast("B")  # the array's buffer, as bytes
        if self.span is not None:
            start, end = self.span
            head = bytearray(self.template[:start])
            tail = bytearray(self.template[end:])
            at = self.tiepoint_offset + 24
            target, at = (head, at) if at < start else (tail, at - end)
            struct.pack_into("<2d", target, at, transform.c, transform.f)
            with open(path, "wb") as f:
                f.write(head)
                f.write(raw)
                f.write(tail)
            return
        buf = bytearray(self.template)
        struct.pack_into("<2d", buf, self.tiepoint_offset + 24, transform.c, transform.f)
        pos = 0
        for offset, count in self.strips:
            buf[offset : offset + count] = raw[pos : pos + count]
            pos += count
        with open(path, "wb") as f:
            f.write(buf)


class _GdalWriter:
    """Plain rasterio writes (compressed or otherwise unusual layouts)."""

    def __init__(self, profile: dict, descriptions, tags, cmap):
        self.profile, self.descriptions, self.tags, self.cmap = profile, descriptions, tags, cmap

    def write(self, path: Path, data: np.ndarray, transform) -> None:
        import rasterio

        with rasterio.open(path, "w", **self.profile, transform=transform) as dst:
            dst.write(data)
            if any(self.descriptions):
                dst.descriptions = self.descriptions
            if self.tags:
                dst.update_tags(**self.tags)
            if self.cmap:
                dst.write_colormap(1, dict(self.cmap))


_WRITERS: dict = {}
_WKTS: dict = {}


def _wkt(crs) -> str:
    """``crs.to_wkt()``, memoised per CRS object (it costs ~0.1 ms, once per chip otherwise)."""
    hit = _WKTS.get(id(crs))
    if hit is None or hit[0] is not crs:
        if len(_WKTS) > 256:
            _WKTS.clear()
        hit = _WKTS[id(crs)] = (crs, crs.to_wkt())
    return hit[1]


def _writer(
    data: np.ndarray, transform, crs, dtype, nodata, descriptions, tags, cmap, creation_options
):
    count, h, w = data.shape
    options = dict(creation_options or {})
    key = (
        count,
        h,
        w,
        dtype,
        _wkt(crs),
        transform.a,
        transform.b,
        transform.d,
        transform.e,
        descriptions,
        tuple(sorted(tags.items())),
        cmap,
        tuple(sorted(options.items())),
    )
    writer = _WRITERS.get(key)
    if writer is None:
        profile = dict(
            driver="GTiff",
            width=w,
            height=h,
            count=count,
            dtype=dtype,
            crs=crs,
            nodata=nodata,
            **options,
        )
        writer = _GdalWriter(profile, descriptions, tags, cmap)
        if not options and transform.b == 0 and transform.d == 0:
            writer = _make_template_writer(writer, data, transform) or writer
        if len(_WRITERS) > 64:
            _WRITERS.clear()
        _WRITERS[key] = writer
    return writer


def _make_template_writer(gdal: _GdalWriter, data: np.ndarray, transform):
    """A template writer, or None when the file GDAL writes is not a plain strip layout."""
    import struct
    import tempfile

    count, h, w = data.shape
    itemsize = np.dtype(gdal.profile["dtype"]).itemsize
    layout = dict(gdal.profile, interleave="band", tiled=False, blockysize=h)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "template.tif"
        _GdalWriter(layout, gdal.descriptions, gdal.tags, gdal.cmap).write(
            path, np.zeros_like(data), transform
        )
        template = path.read_bytes()
    if template[:4] != b"II*\x00":
        return None
    (ifd,) = struct.unpack_from("<I", template, 4)
    (n,) = struct.unpack_from("<H", template, ifd)
    entries = {}
    for k in range(n):
        tag, typ, cnt, val = struct.unpack_from("<HHII", template, ifd + 2 + 12 * k)
        entries[tag] = (typ, cnt, val, ifd + 2 + 12 * k + 8)

    def values(tag):
        typ, cnt, val, inline_at = entries[tag]
        fmt = {3: "H", 4: "I"}.get(typ)
        if fmt is None:
            return None
        size = struct.calcsize(fmt) * cnt
        at = inline_at if size <= 4 else val
        return list(struct.unpack_from(f"<{cnt}{fmt}", template, at))

    if not {273, 279, 33922} <= set(entries) or entries[33922][:2] != (12, 6):
        return None
    offsets, counts = values(273), values(279)
    if offsets is None or counts is None or sum(counts) != count * h * w * itemsize:
        return None
    if entries.get(259, (3, 1, 1, 0))[2] != 1:  # compressed after all
        return None
    return _TemplateWriter(template, list(zip(offsets, counts)), entries[33922][2])


def _rgb(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16)


def read_chip(path: Path) -> tuple[np.ndarray, list[str | None]]:
    """A chip file -> ``(T, C, H, W)`` float32 and its dates (from the DATES tag)."""
    import rasterio

    with rasterio.open(path) as src:
        data = src.read(out_dtype="float32")
        dates = [d or None for d in src.tags().get("DATES", "").split(";")]
    t = max(1, len(dates))
    if data.shape[0] % t:
        raise UserError(f"{path}: {data.shape[0]} bands is not a multiple of {t} dates")
    return data.reshape(t, data.shape[0] // t, *data.shape[1:]), dates


def load_dataset_meta(root: str | os.PathLike) -> dict:
    """``dataset.json`` of a chips dataset; UserError when ``root`` is not one."""
    root = Path(root)
    meta_path = root / META_NAME
    if not meta_path.is_file():
        hint = " (an interrupted tile run? re-run it)" if root.is_dir() else ""
        raise UserError(f"{root}: not a chips dataset, {META_NAME} missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc})") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{meta_path}: chips format version {version}, this geoexplora reads "
            f"version {FORMAT_VERSION}"
        )
    return meta


def read_index(root: str | os.PathLike):
    """``index.parquet`` as a GeoDataFrame."""
    import geopandas as gpd

    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise UserError(f"{Path(root)}: not a chips dataset, {INDEX_NAME} missing")
    return gpd.read_parquet(path)


def _check_inside(root: Path, relative_paths) -> None:
    """The index may only name files inside the dataset folder (a crafted index must not make
    us read elsewhere), and every one must be there: a deleted chip is found before training,
    not at the step that first draws it."""
    base = root.resolve()
    missing = []
    for rel in relative_paths:
        path = (base / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(base):
            raise UserError(
                f"{root / INDEX_NAME} names {rel}, outside the dataset folder; refusing to read it"
            )
        if not path.is_file():
            missing.append(rel)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"{root / INDEX_NAME} names {missing[0]}{more}, missing from the "
            "dataset folder; tile it again"
        )


class ChipsDataset:
    """Map-style dataset over a chips folder (usable with ``torch.utils.data.DataLoader``).

    ``ds[i]`` -> ``{"image": float32 (T, C, H, W) NaN = nodata, "label": int64 (-1 = none),
    "labels": float32 multi-hot (multilabel datasets), "mask": int64 (H, W) 255 = ignore
    (datasets with masks), "chip_id": str}``. Every item of one dataset has the same keys.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, transform=None):
        self.root = Path(root)
        self.meta = load_dataset_meta(self.root)
        index = read_index(self.root)
        if split is not None:
            if split not in ("train", "val", "test"):
                raise UserError(f"split must be train, val or test, not '{split}'")
            index = index[index["split"] == split]
        self.index = index.reset_index(drop=True)
        self.split = split
        self.transform = transform
        self.task: str = self.meta["task"]
        self.bands: list[B.Band] = [B.band_from_key(b["key"]) for b in self.meta["bands"]]
        self.classes: list[dict] = self.meta.get("classes", [])
        self.num_frames: int = self.meta["num_frames"]
        self.chip_size: int = self.meta["chip_size"]
        self.stats: dict = self.meta["stats"]
        self.has_masks = bool(self.index["mask_path"].notna().any()) if len(self.index) else False
        _check_inside(self.root, [*self.index["path"], *self.index["mask_path"].dropna()])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        """Per-chip class ids (int64, -1 = none), in dataset order."""
        return self.index["label"].to_numpy(dtype=np.int64)

    def multi_hot(self, i: int) -> np.ndarray:
        out = np.zeros(self.num_classes, dtype=np.float32)
        text = self.index.at[i, "labels"]
        if isinstance(text, str) and text:
            out[[int(v) for v in text.split(";")]] = 1.0
        return out

    def dates(self, i: int) -> list[str | None]:
        text = self.index.at[i, "dates"]
        return [d or None for d in text.split(";")] if isinstance(text, str) else [None]

    def read_image(self, i: int) -> np.ndarray:
        image, _ = read_chip(self.root / self.index.at[i, "path"])
        return image

    def read_mask(self, i: int) -> np.ndarray:
        import rasterio

        with rasterio.open(self.root / self.index.at[i, "mask_path"]) as src:
            return src.read(1)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        item = {
            "image": torch.from_numpy(self.read_image(i)),
            "label": torch.tensor(int(self.index.at[i, "label"]), dtype=torch.int64),
            "chip_id": str(self.index.at[i, "chip_id"]),
        }
        if self.task == "multilabel":
            item["labels"] = torch.from_numpy(self.multi_hot(i))
        if self.has_masks:
            item["mask"] = torch.from_numpy(self.read_mask(i).astype(np.int64))
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return (
            f"ChipsDataset({str(self.root)!r}, split={self.split!r}: {len(self)} chips, "
            f"task={self.task}, T={self.num_frames}, C={len(self.bands)}, "
            f"size={self.chip_size}, classes={self.num_classes})"
        )
