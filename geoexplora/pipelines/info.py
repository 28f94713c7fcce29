"""Descriptions of rasters, model files and chips datasets for ``geoexplora info``."""

from __future__ import annotations

from pathlib import Path

from geoexplora.errors import UserError


def is_model_file(path: Path) -> bool:
    """Model files are ``.pt``/``.pth`` (the model reader says when one is not ours)."""
    return path.suffix.lower() in (".pt", ".pth")


def is_chips_dataset(path: Path) -> bool:
    from geoexplora.io.chips import META_NAME

    return path.is_dir() and (path / META_NAME).is_file()


def raster_files(paths: list[Path]) -> list[Path]:
    """Paths as given; a folder -> the raster files and model files in it, sorted (a chips
    dataset's folder stands for the dataset)."""
    from geoexplora.io.scene import RASTER_SUFFIXES

    out = []
    for path in paths:
        if path.is_dir() and not is_chips_dataset(path):
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


def describe_dataset(path: Path) -> dict:
    """A chips dataset from its ``dataset.json``: what tile made, and from what."""
    from geoexplora.io.chips import load_dataset_meta

    meta = load_dataset_meta(path)
    counts, prov = meta.get("counts", {}), meta.get("provenance", {})
    chips_per_class = counts.get("classes", {})
    return {
        "path": str(path), "kind": "chips", "task": meta["task"],
        "chip_size": meta["chip_size"], "num_frames": meta["num_frames"],
        "bands": [b["key"] for b in meta["bands"]], "chips": counts.get("chips"),
        "splits": counts.get("splits", {}), "dropped": counts.get("dropped", {}),
        "classes": [{**c, "chips": chips_per_class.get(c["name"])} for c in meta["classes"]],
        "stats": meta["stats"], "crs": prov.get("crs"),
        "split_block_px": prov.get("split_block_px"), "sources": len(prov.get("sources", [])),
        "created": prov.get("created"), "appends": len(prov.get("appended", [])),
    }


def describe_path(path: Path, opts) -> dict:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if is_chips_dataset(path):
        return describe_dataset(path)
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
    if doc["kind"] == "chips":
        _render_dataset(console, doc)
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


def _render_dataset(console, doc: dict) -> None:
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]chips dataset", doc["path"])
    splits = ", ".join(f"{k} {v}" for k, v in sorted(doc["splits"].items()))
    head.add_row("chips", f"{doc['chips']} of {doc['chip_size']} px ({splits}), "
                          f"{doc['num_frames']} date(s) each")
    head.add_row("task", doc["task"])
    head.add_row("bands", ", ".join(doc["bands"]))
    head.add_row("CRS", str(doc["crs"] or "per chip"))
    head.add_row("made", f"{doc['created']} from {doc['sources']} source(s)"
                         + (f", {doc['appends']} append(s)" if doc["appends"] else ""))
    console.print(head)
    table = Table("band", "mean", "std", "p2", "p98")
    for i, key in enumerate(doc["bands"]):
        table.add_row(key, *(f"{doc['stats'][s][i]:.1f}" for s in ("mean", "std", "p2", "p98")))
    console.print(table)
    if doc["classes"]:
        classes = Table("id", "class", "colour", "chips")
        for c in doc["classes"]:
            classes.add_row(str(c["id"]), c["name"], c["color"], str(c["chips"]))
        console.print(classes)
