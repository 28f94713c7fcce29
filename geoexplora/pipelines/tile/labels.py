"""Labels: the task they imply, and candidates that touch none."""

from __future__ import annotations

import logging

import numpy as np

from geoexplora.errors import UserError, opt
from geoexplora.io import chips as C
from geoexplora.pipelines.tile.grid import Candidates

log = logging.getLogger("geoexplora")


def default_task(labels, class_folders: bool) -> str:
    if class_folders:
        return "classification"
    if labels is None:
        return "none"
    return "classification" if labels.kind == "points" else "segmentation"


def check_task(task: str, labels) -> None:
    if task not in C.TASKS:
        raise UserError(f"{opt('task')} {task}: must be one of {', '.join(C.TASKS)}")
    if task != "none" and labels is None:
        raise UserError(
            f"{opt('task')} {task} needs labels: {opt('labels')} PATH {opt('label_field')} NAME or "
            f"{opt('label_raster')} PATH"
        )
    if task == "segmentation" and labels is not None and labels.kind == "points":
        log.warning("segmentation masks from points label single pixels only")


def labels_bounds(labels, crs) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    if labels.kind == "raster":
        return transform_bounds(labels.crs, crs, *labels.bounds)
    return labels.bounds  # already in the target CRS


def drop_unlabelled_candidates(cands: Candidates, labels, crs) -> None:
    """Windows touching no label feature (or outside the label raster) are dropped unread."""
    import shapely
    from shapely import box

    live = np.flatnonzero(cands.drop == "")
    if labels.kind == "raster":
        hit = shapely.intersects(cands.boxes[live], box(*labels_bounds(labels, crs)))
    else:
        from shapely.strtree import STRtree

        tree = STRtree(labels.geometries.values)
        touching = tree.query(cands.boxes[live], predicate="intersects")[0]
        hit = np.zeros(live.size, dtype=bool)
        hit[touching] = True
    cands.drop[live[~hit]] = "unlabelled"
