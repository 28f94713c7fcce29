"""Writing the dataset: index, ``dataset.json``, statistics from the pixel sample."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from geoexplora import __version__
from geoexplora.io import chips as C
from geoexplora.io.outputs import save_npy
from geoexplora.io.stats import BandStatsAccumulator
from geoexplora.pipelines.tile.config import TileConfig

log = logging.getLogger("geoexplora")


def write_index(tmp: Path, records: list[dict], crs) -> None:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(
        records, geometry="geometry", crs=crs.to_string() if hasattr(crs, "to_string") else crs
    )
    gdf.to_parquet(tmp / C.INDEX_NAME, index=False)


def class_counts(
    records: list[dict], classes: list, task: str, class_pixels: np.ndarray | None
) -> list[dict]:
    out = []
    for cl in classes:
        if task == "classification":
            n = sum(1 for r in records if r["label"] == cl.id)
        else:
            n = sum(1 for r in records if str(cl.id) in r["labels"].split(";"))
        entry = {**cl.to_dict(), "chips": n}
        if class_pixels is not None and task == "segmentation":
            entry["pixels"] = int(class_pixels[cl.id])
        out.append(entry)
    return out


def write_meta(
    tmp: Path, *, task, bands, num_frames, size, stats, classes, counts, provenance
) -> None:
    meta = {
        "format_version": C.FORMAT_VERSION,
        "task": task,
        "bands": [{**b.to_dict(), "key": b.key} for b in bands],
        "num_frames": num_frames,
        "chip_size": size,
        "units": C.UNITS,
        "stats": stats,
        "classes": [
            {k: c[k] for k in ("id", "name", "color") if k in c}
            | ({"value": c["value"]} if "value" in c else {})
            for c in classes
        ],
        "counts": counts,
        "provenance": provenance,
    }
    (tmp / C.META_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def dataset_provenance(cfg: TileConfig, sources: list[str], extra: dict | None = None) -> dict:
    config = {
        k: (str(v) if isinstance(v, os.PathLike) else v)
        for k, v in asdict(cfg).items()
        if k not in ("inputs", "output", "overwrite", "append", "dry_run", "progress", "workers")
    }
    return {
        "tool": "geoexplora tile",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "config": config,
        **(extra or {}),
    }


def write_dataset(
    tmp: Path,
    cfg: TileConfig,
    existing,
    *,
    records: list[dict],
    index_crs,
    samples: dict[str, np.ndarray],
    task: str,
    bands: list,
    num_frames: int,
    size: int,
    classes: list,
    class_pixels: np.ndarray | None,
    dropped: Counter,
    sources: list[str],
    extra: dict,
) -> dict:
    """Index, statistics (and their pixel sample) and ``dataset.json`` of this run's chips plus,
    when appending, the existing dataset's. Returns the dataset's counts."""
    if existing is not None:
        records = existing.old_records() + records
        dropped = existing.dropped() + dropped
        if class_pixels is not None:
            class_pixels = class_pixels + existing.class_pixels(len(class_pixels))
        new_chips = len(records) - len(existing.index)
    records.sort(key=lambda r: r["chip_id"])
    write_index(tmp, records, index_crs)
    parts = [samples[cid] for cid in sorted(samples)]
    if existing is not None:
        parts.insert(0, existing.thinned_sample(new_chips, cfg.seed))
    sample = np.concatenate(parts).astype(np.float32, copy=False)  # ~stats_samples rows
    acc = BandStatsAccumulator(len(bands), cfg.stats_samples, cfg.seed)
    acc.update(sample)
    stats = acc.result()
    save_npy(tmp / C.STATS_SAMPLE_NAME, sample)
    class_list = class_counts(records, classes, task, class_pixels)
    counts = {
        "chips": len(records),
        "splits": dict(Counter(r["split"] for r in records)),
        "dropped": dict(dropped),
        "classes": {c["name"]: c["chips"] for c in class_list},
    }
    if task == "segmentation":
        counts["class_pixels"] = {c["name"]: c["pixels"] for c in class_list}
    provenance = dataset_provenance(cfg, sources, extra)
    if existing is not None:
        provenance = existing.provenance(provenance)
    write_meta(
        tmp,
        task=task,
        bands=bands,
        num_frames=num_frames,
        size=size,
        stats=stats,
        classes=class_list,
        counts=counts,
        provenance=provenance,
    )
    return {
        "stats": stats,
        "classes": class_list,
        "splits": counts["splits"],
        "chips": len(records),
    }


def zero_chips_message(dropped: Counter, n_candidates: int) -> str:
    if n_candidates == 0:
        return "no chip fits the scenes (smaller than --size? try --edge pad)"
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
    hints = {
        "nodata": "raise --max-nodata or pass --nodata",
        "outside_aoi": "check --aoi",
        "unlabelled": "the labels cover none of the chips (check --labels and the CRS)",
        "split_buffer": "lower --val-fraction or use --split-block",
    }
    top = dropped.most_common(1)[0][0] if dropped else ""
    return f"zero chips written of {n_candidates} candidates ({why}); {hints.get(top, '')}".strip()


def appeared_hint(cfg: TileConfig) -> str:
    return "re-run with --append to add to it" if cfg.append else "pass --overwrite to replace it"
