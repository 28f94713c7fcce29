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


def raster_files(paths: list) -> list:
    """Paths as given; a folder -> the model files in it and its rasters as every verb finds
    them (:func:`geoexplora.io.inputs.collect_inputs`: recursive, band files only where there
    are some); a chips dataset's folder stands for the dataset."""
    from geoexplora.io.inputs import collect_inputs
    from geoexplora.io.remote import as_path, is_uri
    from geoexplora.io.scene import RASTER_SUFFIXES

    out = []
    for path in paths:
        if is_uri(path):  # a remote file (or a STAC document), as given
            out.append(as_path(path))
            continue
        path = Path(path)
        if path.is_dir() and not is_chips_dataset(path):
            models = sorted(p for p in path.iterdir() if p.is_file() and is_model_file(p))
            has_rasters = any(
                p.is_file() and p.suffix.lower() in RASTER_SUFFIXES for p in path.rglob("*")
            )
            if not models and not has_rasters:
                raise UserError(f"{path}: folder holds no raster or model files")
            out.extend(models + (collect_inputs([path]) if has_rasters else []))
        else:
            out.append(path)
    return out


def describe(paths: list, opts) -> dict:
    """``files``: each raster, model file, chips dataset or STAC document (its items' band
    mapping) described; ``scenes``: the rasters' places as the other verbs group them (one list
    of files per scene)."""
    from geoexplora.io.inputs import group_by_place

    files = raster_files(paths)
    docs = [describe_path(p, opts) for p in files]
    rasters = [p for p, d in zip(files, docs) if d["kind"] == "raster"]
    places = group_by_place(rasters).groups if rasters else ()
    return {"files": docs, "scenes": [[str(p) for p in group] for group in places]}


def describe_raster(path: Path, opts) -> dict:
    from geoexplora.io.scene import inspect_raster

    rf = inspect_raster(path, opts)
    bands = []
    for i, band in enumerate(rf.bands, start=1):
        entry = {"index": i, "description": rf.descriptions[i - 1] if rf.descriptions else None}
        if band is not None:
            entry.update(
                name=band.name,
                sensor=band.sensor,
                key=band.key,
                center_nm=band.center_nm,
                width_nm=band.width_nm,
                gsd_m=band.gsd_m,
            )
        bands.append(entry)
    return {
        "path": str(path),
        "kind": "raster",
        "width": rf.width,
        "height": rf.height,
        "count": rf.count,
        "crs": rf.crs.to_string(),
        "epsg": rf.crs.to_epsg(),
        "resolution": list(rf.res),
        "transform": list(rf.transform)[:6],
        "dtype": rf.dtype,
        "nodata": rf.nodata,
        "sensor": rf.sensor,
        "date": rf.date,
        "bands": bands,
    }


def describe_dataset(path: Path) -> dict:
    """A chips dataset from its ``dataset.json``: what tile made, and from what."""
    from geoexplora.io.chips import load_dataset_meta

    meta = load_dataset_meta(path)
    counts, prov = meta.get("counts", {}), meta.get("provenance", {})
    chips_per_class = counts.get("classes", {})
    return {
        "path": str(path),
        "kind": "chips",
        "task": meta["task"],
        "chip_size": meta["chip_size"],
        "num_frames": meta["num_frames"],
        "bands": [b["key"] for b in meta["bands"]],
        "chips": counts.get("chips"),
        "splits": counts.get("splits", {}),
        "dropped": counts.get("dropped", {}),
        "classes": [{**c, "chips": chips_per_class.get(c["name"])} for c in meta["classes"]],
        "stats": meta["stats"],
        "crs": prov.get("crs"),
        "split_block_px": prov.get("split_block_px"),
        "sources": len(prov.get("sources", [])),
        "created": prov.get("created"),
        "appends": len(prov.get("appended", [])),
    }


def describe_path(path, opts) -> dict:
    from geoexplora.io import stac

    if stac.is_stac_input(path):
        return stac.describe_stac(path)
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
