"""``tile`` as plan -> execute: everything decided (and checked) before a pixel is read."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoexplora.defaults import TILE
from geoexplora.errors import UserError, opt
from geoexplora.io import chips as C
from geoexplora.io.remote import source_name
from geoexplora.log import reports_progress
from geoexplora.pipelines.tile.class_folders import import_class_folders
from geoexplora.pipelines.tile.config import EDGES, TileConfig, TileResult
from geoexplora.pipelines.tile.grid import Candidates, assign_splits, make_candidates
from geoexplora.pipelines.tile.labels import (
    check_task,
    default_task,
    drop_unlabelled_candidates,
    labels_bounds,
)
from geoexplora.pipelines.tile.scenes import open_scenes
from geoexplora.pipelines.tile.workers import (
    BlockTask,
    Plan,
    make_block_tasks,
    read_block,
    run_block,
    run_tasks,
    samples_per_chip,
)
from geoexplora.pipelines.tile.writer import appeared_hint, write_dataset, zero_chips_message

if TYPE_CHECKING:
    from geoexplora.pipelines.append import ExistingDataset

log = logging.getLogger("geoexplora")


@reports_progress
def tile(cfg: TileConfig) -> TileResult:
    """Tile scenes (or import class folders) into a chips dataset at ``cfg.output`` (or, with
    ``cfg.append`` and an existing dataset there, add to it: see ``geoexplora.pipelines.append``).
    With ``cfg.dry_run``: the plan (:meth:`TilePlan.describe`), nothing written."""
    from geoexplora.io.creation_options import check_creation_options

    check_creation_options(cfg.creation_options, "GTiff")  # chips are written as GeoTIFFs
    if cfg.append and not cfg.dry_run:
        from geoexplora.io.outputs import exclusive

        with exclusive(cfg.output):  # from reading the old dataset to swapping in the new one
            return _tile(cfg)
    return _tile(cfg)


def _tile(cfg: TileConfig) -> TileResult:
    start = time.perf_counter()
    resolved = resolve_config(cfg)
    if resolved.cfg.class_folders:
        return import_class_folders(resolved.cfg, start, resolved.existing)
    plan = plan_tile(resolved, start)
    if cfg.dry_run:
        plan.close()
        if plan.to_read == 0:  # as the real run would say
            raise UserError(zero_chips_message(plan.dropped, plan.n_candidates))
        return planned_result(plan)
    return execute(plan)


@dataclass(frozen=True)
class ResolvedConfig:
    """The configuration with every default filled in: the dataset's own when appending
    (``existing``), then ``TILE``'s. ``given`` is the configuration as the caller wrote it."""

    cfg: TileConfig
    given: TileConfig
    existing: ExistingDataset | None
    output: Path


def resolve_config(cfg: TileConfig) -> ResolvedConfig:
    """Check the configuration against itself and the output, and fill in the defaults."""
    from geoexplora.io.outputs import check_not_input, check_output

    check_not_input([cfg.output], [*cfg.inputs, cfg.labels, cfg.label_raster, cfg.aoi])
    if cfg.append and cfg.overwrite:
        raise UserError(
            f"{opt('append')} and {opt('overwrite')} exclude each other: add to the dataset, or "
            "replace it"
        )
    if Path(cfg.output).exists() and not (cfg.append or cfg.overwrite):
        raise UserError(
            f"{cfg.output} exists; pass {opt('append')} to add to it or {opt('overwrite')} to "
            "replace it"
        )
    existing = None
    given = cfg
    if cfg.append and Path(cfg.output).exists():
        from geoexplora.pipelines.append import ExistingDataset

        existing = ExistingDataset.load(Path(cfg.output))
        cfg = existing.with_defaults(cfg)
    carried = [
        k
        for k in ("val_fraction", "test_fraction")
        if getattr(given, k) is None and getattr(cfg, k) is not None
    ]
    cfg = replace(
        cfg,
        **{
            k: getattr(TILE, k)
            for k in ("max_nodata", "min_label_fraction", "val_fraction", "test_fraction")
            if getattr(cfg, k) is None
        },
    )
    if cfg.val_fraction < 0 or cfg.test_fraction < 0 or cfg.val_fraction + cfg.test_fraction >= 1:
        source = (
            f" ({' and '.join('--' + k.replace('_', '-') for k in carried)} from "
            f"{cfg.output}'s first run)"
            if carried
            else ""
        )
        raise UserError(
            f"{opt('val_fraction')} {cfg.val_fraction:g} and {opt('test_fraction')} "
            f"{cfg.test_fraction:g} must be >= 0 and sum to less than 1{source}"
        )
    out = check_output(cfg.output, cfg.overwrite or existing is not None)
    if cfg.edge not in EDGES:
        raise UserError(f"{opt('edge')} {cfg.edge}: must be drop or pad")
    if not 0.0 <= cfg.max_nodata <= 1.0:
        raise UserError(f"{opt('max_nodata')} {cfg.max_nodata}: must be within 0..1")
    if not 0.0 <= cfg.min_label_fraction <= 1.0:
        raise UserError(
            f"{opt('min_label_fraction')} {cfg.min_label_fraction}: must be within 0..1"
        )
    if cfg.workers < 1:
        raise UserError(f"{opt('workers')} {cfg.workers}: must be at least 1")
    return ResolvedConfig(cfg, given, existing, out)


@dataclass
class TilePlan:
    """Everything a tile run decided before reading a pixel: the scenes (open), the labels and
    classes, the candidate chips with their splits and drops, and the blocks to read. A dry run
    describes it; :func:`execute` carries it out."""

    resolved: ResolvedConfig
    task: str
    size: int
    stride: int
    scenes: list
    classes: list
    candidates: Candidates
    n_candidates: int
    dropped: Counter  # known before reading (outside the AOI, unlabelled, overlapping)
    tasks: list[BlockTask]
    block_px: int
    recorded_block: int | None  # the dataset's split block, once chips were split by it
    work: Plan
    skipped: list[str]  # unreadable files (skip_bad)
    already: list[str]  # appending: files already in the dataset
    started: float

    @property
    def to_read(self) -> int:
        return sum(len(t.chips) for t in self.tasks)

    def describe(self) -> dict:
        """The plan as the dry run reports it (JSON-able)."""
        first = self.scenes[0]
        bands = len(first.bands) * len(first.dates)
        block_bytes = max((4 * bands * t.width * t.height for t in self.tasks), default=0)
        return {
            "scenes": [
                {
                    "paths": [str(p) for p in sc.paths],
                    "width": sc.width,
                    "height": sc.height,
                    "resolution": list(sc.res),
                    "dates": sc.dates,
                }
                for sc in self.scenes
            ],
            "crs": first.crs.to_string(),
            "candidates": self.n_candidates,
            "to_read": self.to_read,
            "blocks": len(self.tasks),
            "split_block_px": self.recorded_block,
            "disk_bytes_at_most": self.to_read
            * (4 * bands + (self.task == "segmentation"))
            * self.size
            * self.size,
            # a block being cut, the next being read (per worker)
            "memory_bytes": 2 * block_bytes * self.resolved.cfg.workers,
        }

    def close(self) -> None:
        for scene in self.scenes:
            scene.close()


def plan_tile(resolved: ResolvedConfig, started: float) -> TilePlan:
    """Open the scenes and labels, lay out the candidate chips, split and drop them, and group
    what is left into blocks to read: a :class:`TilePlan`."""
    from geoexplora.io.labels import open_labels

    cfg, given, existing, out = resolved.cfg, resolved.given, resolved.existing, resolved.output
    size = TILE.size if cfg.size is None else cfg.size
    stride = size if cfg.stride is None else cfg.stride
    if size < 1 or stride < 1:
        raise UserError(f"{opt('size')} {size} / {opt('stride')} {stride}: both must be at least 1")
    scenes, skipped, already = open_scenes(cfg, existing)
    first = scenes[0]
    crs = first.crs
    try:
        labels = open_labels(cfg.labels, cfg.label_field, cfg.label_raster, crs, cfg.label_layer)
    except UserError as exc:
        if cfg.label_field != given.label_field:  # taken from the existing dataset
            raise UserError(
                f"{exc.render(opt)} ({opt('label_field')} {cfg.label_field} is the field {out} was "
                f"tiled with; pass {opt('label_field')})"
            ) from exc
        raise
    task = cfg.task or default_task(labels, False)
    check_task(task, labels)
    if labels is not None:
        _check_labels_overlap(labels, scenes, crs)
    classes = labels.classes if labels is not None and task != "none" else []
    class_lut = None
    if existing is not None:
        existing.check_matches([b.key for b in first.bands], len(first.dates), str(first.paths[0]))
        classes, class_lut = existing.merge_classes(classes)

    cands = make_candidates(scenes, size, stride, cfg.edge)
    n_candidates = len(cands)
    if cfg.aoi:
        _apply_aoi(cands, cfg.aoi, crs)
    if labels is not None and task != "none":
        drop_unlabelled_candidates(cands, labels, crs)
    split_res = first.res[0] if existing is None else existing.split_res()
    if existing is not None and not math.isclose(first.res[0], split_res, rel_tol=1e-6):
        log.warning(
            "%s: %.6g m pixels, %s's chips have %.6g m; pass --resolution %.6g for one GSD",
            first.paths[0].name,
            first.res[0],
            existing.root,
            split_res,
            split_res,
        )
    block_px = assign_splits(
        cands,
        size,
        split_res,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.seed,
        cfg.split_block,
        existing.block_splits if existing is not None else None,
    )
    # The block size is the dataset's once chips were split by it (or it was asked for): later
    # appends must keep it; until then they may choose.
    split = (cands.split[cands.drop == ""] != "train").any() or cfg.split_block is not None
    if existing is not None:
        existing.drop_overlapping(cands, first.res[0])
    dropped = Counter(r for r in cands.drop if r)
    tasks = make_block_tasks(cands, scenes, size, stride, cfg.workers)
    n_live = sum(len(t.chips) for t in tasks)
    if "GDAL_NUM_THREADS" not in os.environ:  # else the user's setting stands
        for scene in scenes:
            scene.decode_threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    work = Plan(
        scenes=scenes,
        crss=[write_crs(s.crs) for s in scenes],
        labels=labels if classes else None,
        task=task,
        size=size,
        max_nodata=cfg.max_nodata,
        min_label_fraction=cfg.min_label_fraction,
        num_classes=len(classes),
        class_colors={c.id: c.color for c in classes},
        out=Path(),
        creation_options=dict(cfg.creation_options or {}),
        samples_per_chip=samples_per_chip(cfg, n_live, existing),
        seed=cfg.seed,
        skip_bad=cfg.skip_bad,
        class_lut=class_lut,
        first_scene_number=existing.next_scene_number() if existing is not None else 0,
    )
    log.info(
        "%d candidate chips of %d px (stride %d) in %d scene(s); %d to read in %d blocks",
        n_candidates,
        size,
        stride,
        len(scenes),
        n_live,
        len(tasks),
    )
    return TilePlan(
        resolved=resolved,
        task=task,
        size=size,
        stride=stride,
        scenes=scenes,
        classes=classes,
        candidates=cands,
        n_candidates=n_candidates,
        dropped=dropped,
        tasks=tasks,
        block_px=block_px,
        recorded_block=block_px if split else None,
        work=work,
        skipped=skipped,
        already=already,
        started=started,
    )


def execute(plan: TilePlan) -> TileResult:
    """Read the plan's blocks, write their chips into a temporary folder, then the index and
    ``dataset.json``, and rename the folder into place (appending: swap in the new dataset)."""
    from geoexplora.io.outputs import atomic_output

    cfg, existing, out = plan.resolved.cfg, plan.resolved.existing, plan.resolved.output
    first, work, dropped = plan.scenes[0], plan.work, Counter(plan.dropped)
    with atomic_output(out, cfg.overwrite or existing is not None, appeared_hint(cfg)) as tmp:
        if existing is not None:
            from geoexplora.pipelines.append import link_dataset

            link_dataset(out, tmp)
        (tmp / C.CHIPS_DIR).mkdir(parents=True, exist_ok=True)
        if plan.task == "segmentation":
            (tmp / C.MASKS_DIR).mkdir(exist_ok=True)
        work.out = tmp
        samples: dict[str, np.ndarray] = {}
        records: list[dict] = []
        class_pixels = np.zeros(max(len(plan.classes), 1), dtype=np.int64)
        for res in run_tasks(
            run_block,
            plan.tasks,
            work,
            cfg.workers,
            "tile",
            [len(t.chips) for t in plan.tasks],
            read_block,
        ):
            records.extend(res.records)
            dropped.update(res.dropped)
            class_pixels += res.class_pixels
            samples.update(res.samples)
        if not records:
            raise UserError(zero_chips_message(dropped, plan.n_candidates))
        _add_geometry(records, plan.scenes, work.crss)
        sources = [source_name(p) for s in plan.scenes for p in s.paths]
        extra = {
            "split_block_px": plan.recorded_block,
            "crs": first.crs.to_string(),
            "labels": str(cfg.labels or cfg.label_raster or "") or None,
        }
        dataset = write_dataset(
            tmp,
            cfg,
            existing,
            records=records,
            index_crs=work.crss[0],
            samples=samples,
            task=plan.task,
            bands=first.bands,
            num_frames=len(first.dates),
            size=plan.size,
            classes=plan.classes,
            class_pixels=class_pixels,
            dropped=dropped,
            sources=sources,
            extra=extra,
        )
        for name, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            if fraction > 0 and not dataset["splits"].get(name):
                log.warning(
                    "no %s chips: the scenes hold too few split blocks of %d px for "
                    "--%s-fraction %g; pass a smaller --split-block or a larger "
                    "fraction",
                    name,
                    plan.block_px,
                    name,
                    fraction,
                )
    plan.close()
    return TileResult(
        output=out,
        task=plan.task,
        chips=len(records),
        dataset_chips=dataset["chips"],
        dropped=dict(dropped),
        splits=dataset["splits"],
        classes=dataset["classes"],
        stats=dataset["stats"],
        bands=[b.key for b in first.bands],
        num_frames=len(first.dates),
        chip_size=plan.size,
        seconds=round(time.perf_counter() - plan.started, 3),
        skipped_files=plan.skipped,
        appended=existing is not None,
        already_in_dataset=plan.already,
    )


def planned_result(plan: TilePlan) -> TileResult:
    """The dry run's result: what tile would write, from the candidates alone."""
    existing, first, cands = plan.resolved.existing, plan.scenes[0], plan.candidates
    live = cands.drop == ""
    return TileResult(
        output=plan.resolved.output,
        task=plan.task,
        chips=plan.to_read,
        dataset_chips=plan.to_read + (len(existing.index) if existing is not None else 0),
        dropped=dict(plan.dropped),
        splits=dict(Counter(cands.split[live])),
        classes=[c.to_dict() for c in plan.classes],
        stats={},
        bands=[b.key for b in first.bands],
        num_frames=len(first.dates),
        chip_size=plan.size,
        seconds=round(time.perf_counter() - plan.started, 3),
        skipped_files=plan.skipped,
        appended=existing is not None,
        already_in_dataset=plan.already,
        plan=plan.describe(),
    )


def write_crs(crs):
    """The CRS as an EPSG code when rasterio identifies it as one (same projection parameters).

    A CRS given as bare WKT costs GDAL an identification on every file written (~10 ms a chip).
    """
    from rasterio.crs import CRS

    from geoexplora.io.scene import crs_equivalent

    text = crs.to_string()
    if text.startswith("EPSG:"):
        coded = CRS.from_user_input(text)
        if crs_equivalent(coded, crs):
            return coded
    return crs


def _add_geometry(records: list[dict], scenes: list, crss: list) -> None:
    from shapely import box

    per_scene = [
        (
            c.to_string(),
            ";".join(source_name(p) for p in s.paths),
            ";".join(d or "" for d in s.dates),
        )
        for s, c in zip(scenes, crss)
    ]
    for r in records:
        i = r.pop("scene")
        r["geometry"] = box(
            *C.window_bounds(
                scenes[i].transform, r["col_off"], r["row_off"], r["width"], r["height"]
            )
        )
        r["crs"], r["source"], r["dates"] = per_scene[i]


def _check_labels_overlap(labels, scenes: list, crs) -> None:
    from shapely import box

    lb = box(*labels_bounds(labels, crs))
    for scene in scenes:
        if lb.intersects(box(*scene.grid.bounds)):
            return
    name = getattr(labels, "path", "labels")
    raise UserError(
        f"{name}: the labels do not overlap the scenes (labels bounds "
        f"{_fmt_bounds(lb.bounds)}, first scene {_fmt_bounds(scenes[0].grid.bounds)} "
        f"in {crs.to_string()}); zero chips"
    )


def _fmt_bounds(b) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in b) + ")"


def _apply_aoi(cands: Candidates, aoi_path, crs) -> None:
    import geopandas as gpd
    import shapely

    from geoexplora.io.remote import as_path

    try:
        aoi = gpd.read_file(as_path(aoi_path))  # a URI opens through GDAL's /vsi... path
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise UserError(
            f"{opt('aoi')} {aoi_path}: not a readable vector file ({str(exc).splitlines()[0]})"
        ) from exc
    if aoi.empty or aoi.crs is None:
        raise UserError(f"{opt('aoi')} {aoi_path}: empty or without a CRS")
    area = aoi.to_crs(crs.to_wkt()).union_all()
    live = np.flatnonzero(cands.drop == "")
    inside = shapely.intersects(cands.boxes[live], area)
    cands.drop[live[~inside]] = "outside_aoi"
