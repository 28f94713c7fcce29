"""Descriptions of rasters and model files for ``geoexplora info``."""

from __future__ import annotations

from pathlib import Path

from geoexplora.errors import UserError


def is_model_file(path: Path) -> bool:
    """Model files are ``.pt``/``.pth`` (the model reader says when one is not ours)."""
    return path.suffix.lower() in (".pt", ".pth")


def raster_files(paths: list[Path]) -> list[Path]:
    """Paths as given; a folder -> the raster files and model files in it, sorted."""
    from geoexplora.io.scene import RASTER_SUFFIXES

    out = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in
                           (*RASTER_SUFFIXES, ".pt", ".pth"))
            if not found:
                raise UserError(f"{path}: folder holds no raster or model files")
            out.extend(found)
        else:
            out.append(path)
    return out


def describe_raster(path: Path, opts) -> dict:
    from geoexplora.io.scene import inspect_raster

    rf = inspect_raster(path, opts)
    bands = []
    for i, band in enumerate(rf.bands, start=1):
        entry = {"index": i, "description": rf.descriptions[i - 1] if rf.descriptions else None}
        if band is not None:
            entry.update(name=band.name, sensor=band.sensor, key=band.key,
                         center_nm=band.center_nm, width_nm=band.width_nm, gsd_m=band.gsd_m)
        bands.append(entry)
    return {
        "path": str(path), "kind": "raster", "width": rf.width, "height": rf.height,
        "count": rf.count, "crs": rf.crs.to_string(), "epsg": rf.crs.to_epsg(),
        "resolution": list(rf.res), "transform": list(rf.transform)[:6], "dtype": rf.dtype,
        "nodata": rf.nodata, "sensor": rf.sensor, "date": rf.date, "bands": bands,
    }


def describe_path(path: Path, opts) -> dict:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if is_model_file(path):
        from geoexplora.models.file import model_card

        card = model_card(path)
        # "kind" tells rasters from models here; the model's own kind (backbone/task) is kept.
        return {**card, "path": str(path), "kind": "model", "model_kind": card.get("kind")}
    return describe_raster(path, opts)


def render_description(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if doc["kind"] == "model":
        from geoexplora.models.file import render_model_card

        console.print(render_model_card(doc))
        return
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]file", doc["path"])
    head.add_row("size", f"{doc['width']} x {doc['height']} px, {doc['count']} band(s), {doc['dtype']}")
    head.add_row("CRS", f"{doc['crs']}")
    head.add_row("resolution", f"{doc['resolution'][0]:g} x {doc['resolution'][1]:g}")
    head.add_row("nodata", "none" if doc["nodata"] is None else f"{doc['nodata']:g}")
    head.add_row("sensor", doc["sensor"] or "unknown (pass --sensor or --band-map)")
    head.add_row("date", doc["date"] or "unknown")
    console.print(head)
    table = Table("#", "description", "band", "sensor", "wavelength nm", "GSD m")
    for b in doc["bands"]:
        table.add_row(str(b["index"]), b["description"] or "", b.get("name", "?"),
                      b.get("sensor", ""), f"{b['center_nm']:g}" if "center_nm" in b else "",
                      f"{b['gsd_m']:g}" if "gsd_m" in b else "")
    console.print(table)
