"""``tile``: scenes (and labels) -> a chips dataset (see ``geoexplora.io.chips`` for the format).

How it works:

1. Inputs (files, folders, globs) are grouped into scenes: files whose footprints coincide are one
   place (one file per band and/or per date, aligned on one grid by ``open_scene``); scenes in
   another CRS are reprojected to ``crs`` (or the first scene's).
2. Each scene gets a grid of candidate windows (``size``, ``stride``, ``edge``); windows outside
   the AOI, or (when labels are required) touching no label, are dropped without reading pixels.
3. Splits are assigned by spatial blocks of the target CRS, then any val/test chip overlapping a
   chip of another split is dropped, so overlapping chips never straddle train and val/test.
4. Pixels are read once, in blocks of several chips bounded in memory, and chips are cut from
   memory and written (in parallel with ``workers``); chips over ``max_nodata`` are dropped.
5. Statistics (``io.stats``) come from a pixel sample of the written chips. The index and
   ``dataset.json`` are written last, and the folder is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from geoexplora import __version__
from geoexplora.bands import band_from_key
from geoexplora.config_checks import path_list
from geoexplora.defaults import TILE
from geoexplora.errors import UserError
from geoexplora.io import chips as C
from geoexplora.io.inputs import check_same_bands, collect_inputs, group_by_place
from geoexplora.io.stats import BandStatsAccumulator, pixel_sample
from geoexplora.log import Progress, reports_progress

log = logging.getLogger("geoexplora")

BLOCK_BUDGET_BYTES = 64 * 2**20  # pixels held per read block (per worker)
EDGES = ("drop", "pad")


@dataclass
class TileConfig:
    """What ``geoexplora tile`` does; every CLI option has a field here."""

    inputs: list[str | os.PathLike]  # files, folders, globs: see geoexplora.io.inputs
    output: str | os.PathLike
    size: int | None = None  # default TILE.size (class folders: the patch size)
    stride: int | None = None  # default: size (no overlap)
    bands: list[str] | None = None
    sensor: str | None = None
    band_map: dict[str, str] | None = None
    nodata: float | None = None
    s2_offset: str = "auto"
    resolution: float | None = None
    dates: list[str] | None = None
    crs: str | None = None
    labels: str | os.PathLike | None = None  # vector file
    label_field: str | None = None
    label_layer: str | None = None
    label_raster: str | os.PathLike | None = None
    class_folders: bool = False
    task: str | None = None  # default from the labels: see _default_task
    min_label_fraction: float | None = None  # None: TILE's (or, appending, the dataset's)
    aoi: str | os.PathLike | None = None
    max_nodata: float | None = None  # None: TILE's (or, appending, the dataset's)
    edge: str = "drop"
    val_fraction: float | None = None  # None: TILE's (or, appending, the dataset's)
    test_fraction: float | None = None  # None: TILE's (or, appending, the dataset's)
    split_block: int | None = None  # pixels; default: see _auto_block
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    append: bool = False  # add to an existing dataset (see geoexplora.pipelines.append)
    dry_run: bool = False  # plan only: TileResult.plan, nothing read or written
    skip_bad: bool = False
    creation_options: dict[str, str] | None = None
    stats_samples: int = 200_000
    progress: Progress = True  # False, or a callback (see geoexplora.log)

    def __post_init__(self):
        self.inputs = path_list("inputs", self.inputs)


@dataclass
class TileResult:
    """What a run did. ``chips`` and ``dropped`` are this run's; ``dataset_chips``, ``splits``,
    ``classes`` and ``stats`` describe the whole dataset (they differ with ``append``)."""

    output: Path
    task: str
    chips: int
    dataset_chips: int
    dropped: dict[str, int]
    splits: dict[str, int]
    classes: list[dict]
    stats: dict[str, list[float]]
    bands: list[str]
    num_frames: int
    chip_size: int
    seconds: float
    skipped_files: list[str] = field(default_factory=list)  # unreadable (skip_bad)
    appended: bool = False
    already_in_dataset: list[str] = field(default_factory=list)  # appending: files skipped
    # With dry_run: what would be done (chips: at most this many; dropped: known before
    # reading; splits: of the chips to read; no statistics).
    plan: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


# ----------------------------------------------------------------------------- inputs and scenes

def scene_options_from(cfg: TileConfig, crs: str | None = None):
    from geoexplora.io.scene import SceneOptions

    return SceneOptions(bands=cfg.bands, sensor=cfg.sensor, band_map=cfg.band_map,
                        resolution=cfg.resolution, nodata=cfg.nodata, dates=cfg.dates,
                        s2_offset=cfg.s2_offset, crs=crs)


def open_scenes(cfg: TileConfig, existing=None) -> tuple[list, list[str], list[str]]:
    """Open every place named by the inputs on the target CRS; check they agree on bands/dates.

    Returns the scenes, the files skipped as unreadable (``skip_bad``) and, appending to
    ``existing``, the files skipped as already in it (left out before grouping by place, so a
    new date of a known place is a scene of its own).
    """
    import rasterio

    from geoexplora.io.scene import open_scene

    paths = collect_inputs(cfg.inputs)
    already = []
    if existing is not None:
        known = existing.known_sources()
        already = [p for p in paths if p.resolve() in known]
        paths = [p for p in paths if p.resolve() not in known]
        if not paths:
            raise UserError(f"nothing to append: every file given is already in "
                            f"{existing.root}")
        if already:
            log.warning("%d file(s) already in %s, skipped: %s", len(already), existing.root,
                        ", ".join(p.name for p in already[:5]) + (", ..." if len(already) > 5
                                                                 else ""))
    places = group_by_place(paths, cfg.skip_bad)
    groups, skipped = places.groups, list(places.skipped)
    if not groups:
        raise UserError("no readable input scenes")
    if cfg.dates and len(groups) > 1:
        raise UserError(f"--dates applies to one scene; the inputs are {len(groups)} places")
    target = cfg.crs
    if target is None:
        with rasterio.open(groups[0][0]) as src:
            target = src.crs.to_string()
    scenes = []
    for group in groups:
        try:
            scene = open_scene(group, scene_options_from(cfg, target))
            if (existing is not None and existing.meta["num_frames"] == 1
                    and len(scene.dates) > 1 and not cfg.dates):
                scenes.extend(_one_scene_per_date(scene, scene_options_from(cfg, target)))
                continue
        except UserError as exc:
            if not cfg.skip_bad:
                raise
            log.warning("skipped (--skip-bad): %s", exc)
            skipped.extend(str(p) for p in group)
            continue
        scenes.append(scene)
    if not scenes:
        raise UserError("no readable input scenes (all skipped)")
    check_same_bands(scenes)
    first = scenes[0]
    for scene in scenes[1:]:
        if len(scene.dates) != len(first.dates):
            raise UserError(f"{scene.paths[0]}: {len(scene.dates)} date(s), "
                            f"{first.paths[0]} has {len(first.dates)}; tile them separately")
        if scene.res != first.res:
            log.warning("%s: %.6g m pixels, %s has %.6g m; pass --resolution for one GSD",
                        scene.paths[0].name, scene.res[0], first.paths[0].name, first.res[0])
    if len(scenes) > 1:
        log.info("%d scenes (places) from %d files", len(scenes),
                 sum(len(s.paths) for s in scenes))
    return scenes, skipped, [str(p) for p in already]


def _one_scene_per_date(scene, opts) -> list:
    """A several-date scene as one scene per date (appending to a dataset of one-date chips:
    new dates of a known place are more chips of it, not a time series)."""
    from geoexplora.io.scene import open_scene

    scene.close()
    return [open_scene(sorted({sb.path for sb in frame}), opts) for frame in scene.sources]


# ----------------------------------------------------------------------------- windows and splits

def window_offsets(length: int, size: int, stride: int, edge: str) -> list[int]:
    """Window starts along one axis. ``drop``: whole windows only; ``pad``: the last window may
    reach past the end (read as nodata) so every pixel is covered."""
    offsets = list(range(0, length - size + 1, stride))
    if edge == "pad":
        if not offsets:
            offsets = [0]
        while offsets[-1] + size < length:
            offsets.append(offsets[-1] + stride)
    return offsets


@dataclass
class Candidates:
    """Candidate windows of all scenes, as parallel arrays."""

    scene: np.ndarray
    row: np.ndarray
    col: np.ndarray
    boxes: np.ndarray  # shapely boxes in the target CRS
    split: np.ndarray  # "train"|"val"|"test"
    drop: np.ndarray  # "" or the reason

    def __len__(self) -> int:
        return len(self.scene)


# Memory one candidate window holds while the candidates are listed (a shapely box, four list
# entries, two object-array slots): 548 bytes measured on 200,000 candidates; 600 with margin.
CANDIDATE_BYTES = 600


def make_candidates(scenes: list, size: int, stride: int, edge: str) -> Candidates:
    from shapely import box

    from geoexplora.memory import check_fits

    planned = sum(len(window_offsets(s.height, size, stride, edge))
                  * len(window_offsets(s.width, size, stride, edge)) for s in scenes)
    check_fits(planned * CANDIDATE_BYTES, f"listing {planned:,} candidate chips of {size} px "
               f"(stride {stride})", "use a larger --resolution (coarser pixels), --size or --stride, "
               "or an --aoi")
    sc, rows, cols, boxes = [], [], [], []
    for i, scene in enumerate(scenes):
        r_offs = window_offsets(scene.height, size, stride, edge)
        c_offs = window_offsets(scene.width, size, stride, edge)
        if not r_offs or not c_offs:
            log.warning("%s: %d x %d px is smaller than one %d px chip; skipped (--edge pad keeps "
                        "it, padded with nodata)", scene.paths[0].name, scene.width, scene.height,
                        size)
            continue
        for r in r_offs:
            for c in c_offs:
                sc.append(i)
                rows.append(r)
                cols.append(c)
                boxes.append(box(*C.window_bounds(scene.transform, c, r, size, size)))
    n = len(sc)
    return Candidates(np.array(sc, dtype=np.int64), np.array(rows, dtype=np.int64),
                      np.array(cols, dtype=np.int64), np.array(boxes, dtype=object),
                      np.full(n, "train", dtype=object), np.full(n, "", dtype=object))


def _auto_block(cands: Candidates, size: int, res: float) -> int:
    """Largest block (8, 4, 2 or 1 chips wide) giving at least 20 blocks, for useful splits."""
    for k in (8, 4, 2):
        if len(_block_keys(cands, size * k * res)) >= 20:
            return size * k
    return size


def _block_keys(cands: Candidates, block_m: float) -> dict:
    import shapely

    centres = shapely.centroid(cands.boxes)
    xs, ys = shapely.get_x(centres), shapely.get_y(centres)
    keys = {}
    for i, key in enumerate(zip(np.floor(xs / block_m).astype(np.int64),
                                np.floor(ys / block_m).astype(np.int64))):
        keys.setdefault(key, []).append(i)
    return keys


def assign_splits(cands: Candidates, size: int, res: float, val_fraction: float,
                  test_fraction: float, seed: int, block_px: int | None = None,
                  fixed_blocks=None) -> int | None:
    """Spatially blocked splits; val/test chips overlapping another split's chip are dropped.

    Blocks (``block_px`` squares of the target CRS) go to test, then val, until each reaches its
    fraction of the candidates; one block is always kept for train. ``fixed_blocks(block_m)``
    (appending) gives the blocks that keep a split: block key -> split. Returns the block size
    used, None when nothing was split.
    """
    import shapely
    from shapely.strtree import STRtree

    live = np.flatnonzero(cands.drop == "")
    if not (val_fraction or test_fraction or fixed_blocks) or live.size == 0:
        return block_px
    sub = Candidates(*(getattr(cands, f)[live] for f in
                       ("scene", "row", "col", "boxes", "split", "drop")))
    block_px = block_px or _auto_block(sub, size, res)
    blocks = _block_keys(sub, block_px * res)
    keys = sorted(blocks)
    order = np.random.default_rng(seed).permutation(len(keys))
    want = {"test": round(test_fraction * live.size), "val": round(val_fraction * live.size)}
    have = {"test": 0, "val": 0}
    fixed = fixed_blocks(block_px * res) if fixed_blocks else {}
    if len(keys) < 2 and not fixed:
        log.warning("one spatial block only (%d px); all chips go to train (pass a smaller "
                    "--split-block)", block_px)
    for key in keys:
        if key in fixed and fixed[key] != "train":
            have[fixed[key]] += len(blocks[key])
    for n, k in enumerate(order):
        members = live[blocks[keys[k]]]
        split = "train"
        if keys[k] in fixed:
            split = fixed[keys[k]]
        elif n > 0:  # the first block of the permutation stays in train
            for s in ("test", "val"):
                if have[s] < want[s]:
                    split = s
                    break
        if split != "train":
            have[split] += len(members)
        cands.split[members] = split
    # Buffer: drop val/test chips overlapping a chip of another split (train wins, then val).
    boxes = shapely.buffer(cands.boxes[live], -1e-3 * res, join_style="mitre")
    tree = STRtree(boxes)
    left, right = tree.query(boxes, predicate="intersects")
    rank = {"train": 0, "val": 1, "test": 2}
    ranks = np.array([rank[s] for s in cands.split[live]])
    for against in (0, 1):  # first anything overlapping train, then test overlapping val
        alive = cands.drop[live] == ""
        conflict = alive[left] & alive[right] & (ranks[left] != ranks[right])
        a, b = left[conflict], right[conflict]
        lower = np.where(ranks[a] < ranks[b], a, b)
        higher = np.where(ranks[a] < ranks[b], b, a)
        losers = np.unique(higher[ranks[lower] == against])
        cands.drop[live[losers]] = "split_buffer"
    return block_px


# ----------------------------------------------------------------------------- labels

def _default_task(labels, class_folders: bool) -> str:
    if class_folders:
        return "classification"
    if labels is None:
        return "none"
    return "classification" if labels.kind == "points" else "segmentation"


def _check_task(task: str, labels) -> None:
    if task not in C.TASKS:
        raise UserError(f"--task {task}: must be one of {', '.join(C.TASKS)}")
    if task != "none" and labels is None:
        raise UserError(f"--task {task} needs labels: --labels PATH --label-field NAME or "
                        "--label-raster PATH")
    if task == "segmentation" and labels is not None and labels.kind == "points":
        log.warning("segmentation masks from points label single pixels only")


def _labels_bounds(labels, crs) -> tuple[float, float, float, float]:
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
        hit = shapely.intersects(cands.boxes[live], box(*_labels_bounds(labels, crs)))
    else:
        from shapely.strtree import STRtree

        tree = STRtree(labels.geometries.values)
        touching = tree.query(cands.boxes[live], predicate="intersects")[0]
        hit = np.zeros(live.size, dtype=bool)
        hit[touching] = True
    cands.drop[live[~hit]] = "unlabelled"


# ----------------------------------------------------------------------------- the work

@dataclass
class Plan:
    """What every worker needs (sent once per worker process)."""

    scenes: list
    crss: list  # per scene, as written into chips (see write_crs)
    labels: object | None
    task: str
    size: int
    max_nodata: float
    min_label_fraction: float
    num_classes: int
    class_colors: dict[int, str]
    out: Path
    creation_options: dict[str, str]
    samples_per_chip: int
    seed: int
    skip_bad: bool
    first_scene_number: int = 0  # chip ids count scenes from here (after an existing dataset's)
    class_lut: np.ndarray | None = None  # label ids -> the dataset's class ids (append)


@dataclass
class BlockTask:
    index: int
    scene: int
    row0: int
    col0: int
    height: int
    width: int
    chips: list[tuple[int, int, str]]  # (row, col, split)


@dataclass
class BlockResult:
    records: list[dict]
    samples: dict[str, np.ndarray]  # chip id -> pixel sample (see _chip_rng)
    dropped: Counter
    class_pixels: np.ndarray


_PLAN: Plan | None = None


def _init_worker(plan: Plan) -> None:
    global _PLAN
    _PLAN = plan


def make_block_tasks(cands: Candidates, scenes: list, size: int, stride: int,
                     workers: int = 1) -> list[BlockTask]:
    """Group the live candidates into read blocks of several chips, bounded in memory, and at
    least about four blocks per worker, so reading one block overlaps writing the last."""
    tasks: list[BlockTask] = []
    live = cands.drop == ""
    total_px = sum(s.width * s.height for s in scenes)
    for s, scene in enumerate(scenes):
        mine = np.flatnonzero(live & (cands.scene == s))
        if mine.size == 0:
            continue
        px_budget = BLOCK_BUDGET_BYTES // (4 * scene.shape[0] * scene.shape[1])
        px_budget = max(size * size, min(px_budget, total_px // (4 * workers)))
        span_cols = max(1, (px_budget // size - size) // stride + 1)
        rows = np.unique(cands.row[mine])
        cols = np.unique(cands.col[mine])
        col_groups = [cols[i:i + span_cols] for i in range(0, cols.size, span_cols)]
        for cg in col_groups:
            width = int(cg[-1] - cg[0] + size)
            span_rows = max(1, (px_budget // width - size) // stride + 1)
            in_cols = mine[(cands.col[mine] >= cg[0]) & (cands.col[mine] <= cg[-1])]
            for i in range(0, rows.size, span_rows):
                rg = rows[i:i + span_rows]
                sel = in_cols[(cands.row[in_cols] >= rg[0]) & (cands.row[in_cols] <= rg[-1])]
                if sel.size == 0:
                    continue
                r0, c0 = int(cands.row[sel].min()), int(cands.col[sel].min())
                tasks.append(BlockTask(
                    len(tasks), s, r0, c0, int(cands.row[sel].max() - r0 + size),
                    int(cands.col[sel].max() - c0 + size),
                    [(int(cands.row[k]), int(cands.col[k]), str(cands.split[k])) for k in sel]))
    return tasks


def chip_id(scene: int, row: int, col: int) -> str:
    return f"s{scene:03d}_r{row:06d}_c{col:06d}"


def _read_block(plan: Plan, task: BlockTask):
    """The block's pixels, or None if unreadable and --skip-bad (UserError otherwise)."""
    import rasterio
    from rasterio.windows import Window

    scene = plan.scenes[task.scene]
    try:
        return scene.read(Window(task.col0, task.row0, task.width, task.height))
    except (rasterio.errors.RasterioError, OSError) as exc:
        names = ", ".join(p.name for p in scene.paths)
        message = f"{names}: read failed ({str(exc).splitlines()[0]})"
        if plan.skip_bad:
            log.warning("skipped (--skip-bad): %s", message)
            return None
        raise UserError(message) from exc


_NOT_READ = object()


def run_block(task: BlockTask, block=_NOT_READ) -> BlockResult:
    """Cut one block's chips, filter, label and write them (reading the block unless given:
    ``_read_block``'s result, None when unreadable)."""
    from rasterio.windows import Window

    plan = _PLAN
    scene = plan.scenes[task.scene]
    size = plan.size
    dropped: Counter = Counter()
    class_pixels = np.zeros(max(plan.num_classes, 1), dtype=np.int64)
    records, samples = [], {}
    if block is _NOT_READ:
        block = _read_block(plan, task)
    if block is None:
        dropped["unreadable"] += len(task.chips)
        return BlockResult([], {}, dropped, class_pixels)
    block_window = Window(task.col0, task.row0, task.width, task.height)
    label_block = (plan.labels.read_mask(scene.grid, block_window)
                   if plan.labels is not None and plan.task != "none" else None)
    if label_block is not None and plan.class_lut is not None:
        label_block = plan.class_lut[label_block]
    valid_block = np.isfinite(block).all(axis=1).any(axis=0)  # a pixel is valid on some date
    for row, col, split in task.chips:
        r, c = row - task.row0, col - task.col0
        data = block[:, :, r:r + size, c:c + size]
        valid = valid_block[r:r + size, c:c + size]
        nodata_fraction = 1.0 - float(valid.mean())
        if nodata_fraction > plan.max_nodata or nodata_fraction >= 1.0:
            dropped["nodata"] += 1
            continue
        label, present, mask = C.NO_LABEL, [], None
        if label_block is not None:
            mask = np.where(valid, label_block[r:r + size, c:c + size], C.IGNORE_INDEX)
            counts = np.bincount(mask[mask != C.IGNORE_INDEX].ravel(), minlength=plan.num_classes)
            share = counts / float(size * size)
            if counts.sum() and share.max() >= plan.min_label_fraction:
                label = int(counts.argmax())
            present = [int(k) for k in np.flatnonzero((counts > 0)
                                                      & (share >= plan.min_label_fraction))]
            unlabelled = {"classification": label == C.NO_LABEL, "multilabel": not present,
                          "segmentation": counts.sum() == 0}[plan.task]
            if unlabelled:
                dropped["unlabelled"] += 1
                continue
            class_pixels += counts
        cid = chip_id(plan.first_scene_number + task.scene, row, col)
        transform = C.window_transform(scene.transform, col, row)
        chip_path = f"{C.CHIPS_DIR}/{cid}.tif"
        data = np.ascontiguousarray(data)  # one copy, for the file and the pixel sample
        C.write_chip(plan.out / chip_path, data, transform, plan.crss[task.scene], scene.bands,
                     scene.dates, plan.creation_options)
        mask_path = None
        if mask is not None and plan.task == "segmentation":
            mask_path = f"{C.MASKS_DIR}/{cid}.tif"
            C.write_mask(plan.out / mask_path, mask.astype(np.uint8), transform,
                         plan.crss[task.scene], plan.class_colors, plan.creation_options)
        samples[cid] = pixel_sample(data, plan.samples_per_chip, _chip_rng(plan.seed, cid))
        records.append({
            "chip_id": cid, "path": chip_path, "mask_path": mask_path, "scene": task.scene,
            "col_off": col, "row_off": row, "width": size, "height": size, "label": label,
            "labels": ";".join(map(str, present)), "nodata_fraction": nodata_fraction,
            "split": split})
    return BlockResult(records, samples, dropped, class_pixels)


def _chip_rng(seed: int, cid: str) -> np.random.Generator:
    """A generator per chip: statistics do not depend on how chips were grouped or ordered."""
    return np.random.default_rng((seed, zlib.crc32(cid.encode())))


def _samples_per_chip(cfg: TileConfig, new_chips: int, existing) -> int:
    """Pixels sampled per chip so that all chips (old ones too) give ~``stats_samples``."""
    total = new_chips + (len(existing.index) if existing is not None else 0)
    return max(16, math.ceil(cfg.stats_samples / max(total, 1)))


def run_tasks(fn, tasks: list, plan, workers: int, description: str, weights: list[int],
              read_ahead=None):
    """Run ``fn`` over ``tasks`` (inline, or in ``workers`` processes), yielding results in
    completion order, with a progress bar advanced by each task's weight.

    Inline, ``read_ahead(plan, task)`` (when given) runs in a thread one task ahead and its
    result is passed as ``fn(task, prefetched)``: GDAL reads without the Python lock, so the next
    block is decoded while this one's chips are written.
    """
    from geoexplora.log import make_progress

    with make_progress() as progress:
        bar = progress.add_task(description, total=sum(weights), info="")

        def advance(weight):
            progress.advance(bar, weight)

        if workers <= 1 or len(tasks) <= 1:
            _init_worker(plan)
            if read_ahead is None:
                for task, weight in zip(tasks, weights):
                    yield fn(task)
                    advance(weight)
                return
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
                ahead = reader.submit(read_ahead, plan, tasks[0]) if tasks else None
                for i, (task, weight) in enumerate(zip(tasks, weights)):
                    prefetched = ahead.result()
                    if i + 1 < len(tasks):
                        ahead = reader.submit(read_ahead, plan, tasks[i + 1])
                    yield fn(task, prefetched)
                    advance(weight)
            return
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(plan,)) as pool:
            pending = {}
            queue = iter(zip(tasks, weights))
            try:
                for task, weight in queue:  # keep a bounded number in flight
                    pending[pool.submit(fn, task)] = weight
                    if len(pending) >= 4 * workers:
                        break
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        weight = pending.pop(fut)
                        yield fut.result()
                        advance(weight)
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending[pool.submit(fn, nxt[0])] = nxt[1]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


# ----------------------------------------------------------------------------- writing the dataset

def _write_index(tmp: Path, records: list[dict], crs) -> None:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(records, geometry="geometry",
                           crs=crs.to_string() if hasattr(crs, "to_string") else crs)
    gdf.to_parquet(tmp / C.INDEX_NAME, index=False)


def _class_counts(records: list[dict], classes: list, task: str,
                  class_pixels: np.ndarray | None) -> list[dict]:
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


def _write_meta(tmp: Path, *, task, bands, num_frames, size, stats, classes, counts,
                provenance) -> None:
    meta = {
        "format_version": C.FORMAT_VERSION,
        "task": task,
        "bands": [{**b.to_dict(), "key": b.key} for b in bands],
        "num_frames": num_frames,
        "chip_size": size,
        "units": C.UNITS,
        "stats": stats,
        "classes": [{k: c[k] for k in ("id", "name", "color") if k in c} |
                    ({"value": c["value"]} if "value" in c else {}) for c in classes],
        "counts": counts,
        "provenance": provenance,
    }
    (tmp / C.META_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _provenance(cfg: TileConfig, sources: list[str], extra: dict | None = None) -> dict:
    config = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(cfg).items()
              if k not in ("inputs", "output", "overwrite", "append", "dry_run", "progress",
                           "workers")}
    return {"tool": "geoexplora tile", "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": sources, "config": config, **(extra or {})}


def _write_dataset(tmp: Path, cfg: TileConfig, existing, *, records: list[dict], index_crs,
                   samples: dict[str, np.ndarray], task: str, bands: list, num_frames: int,
                   size: int, classes: list, class_pixels: np.ndarray | None, dropped: Counter,
                   sources: list[str], extra: dict) -> dict:
    """Index, statistics (and their pixel sample) and ``dataset.json`` of this run's chips plus,
    when appending, the existing dataset's. Returns the dataset's counts."""
    if existing is not None:
        records = existing.old_records() + records
        dropped = existing.dropped() + dropped
        if class_pixels is not None:
            class_pixels = class_pixels + existing.class_pixels(len(class_pixels))
        new_chips = len(records) - len(existing.index)
    records.sort(key=lambda r: r["chip_id"])
    _write_index(tmp, records, index_crs)
    parts = [samples[cid] for cid in sorted(samples)]
    if existing is not None:
        parts.insert(0, existing.thinned_sample(new_chips, cfg.seed))
    sample = np.concatenate(parts).astype(np.float32, copy=False)  # ~stats_samples rows
    acc = BandStatsAccumulator(len(bands), cfg.stats_samples, cfg.seed)
    acc.update(sample)
    stats = acc.result()
    np.save(tmp / C.STATS_SAMPLE_NAME, sample, allow_pickle=False)
    class_list = _class_counts(records, classes, task, class_pixels)
    counts = {"chips": len(records), "splits": dict(Counter(r["split"] for r in records)),
              "dropped": dict(dropped), "classes": {c["name"]: c["chips"] for c in class_list}}
    if task == "segmentation":
        counts["class_pixels"] = {c["name"]: c["pixels"] for c in class_list}
    provenance = _provenance(cfg, sources, extra)
    if existing is not None:
        provenance = existing.provenance(provenance)
    _write_meta(tmp, task=task, bands=bands, num_frames=num_frames, size=size, stats=stats,
                classes=class_list, counts=counts, provenance=provenance)
    return {"stats": stats, "classes": class_list, "splits": counts["splits"],
            "chips": len(records)}


def _zero_chips_message(dropped: Counter, n_candidates: int) -> str:
    if n_candidates == 0:
        return "no chip fits the scenes (smaller than --size? try --edge pad)"
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
    hints = {"nodata": "raise --max-nodata or pass --nodata", "outside_aoi": "check --aoi",
             "unlabelled": "the labels cover none of the chips (check --labels and the CRS)",
             "split_buffer": "lower --val-fraction or use --split-block"}
    top = dropped.most_common(1)[0][0] if dropped else ""
    return f"zero chips written of {n_candidates} candidates ({why}); {hints.get(top, '')}".strip()


@reports_progress
def tile(cfg: TileConfig) -> TileResult:
    """Tile scenes (or import class folders) into a chips dataset at ``cfg.output`` (or, with
    ``cfg.append`` and an existing dataset there, add to it: see ``geoexplora.pipelines.append``)."""
    from geoexplora.io.creation_options import check_creation_options

    check_creation_options(cfg.creation_options, "GTiff")  # chips are written as GeoTIFFs
    if cfg.append and not cfg.dry_run:
        from geoexplora.io.outputs import exclusive

        with exclusive(cfg.output):  # from reading the old dataset to swapping in the new one
            return _tile(cfg)
    return _tile(cfg)


def _tile(cfg: TileConfig) -> TileResult:
    from geoexplora.io.outputs import atomic_output, check_not_input, check_output

    start = time.perf_counter()
    check_not_input([cfg.output], [*cfg.inputs, cfg.labels, cfg.label_raster, cfg.aoi])
    if cfg.append and cfg.overwrite:
        raise UserError("--append and --overwrite exclude each other: add to the dataset, or "
                        "replace it")
    if Path(cfg.output).exists() and not (cfg.append or cfg.overwrite):
        raise UserError(f"{cfg.output} exists; pass --append to add to it or --overwrite to "
                        "replace it")
    existing = None
    given = cfg
    if cfg.append and Path(cfg.output).exists():
        from geoexplora.pipelines.append import ExistingDataset

        existing = ExistingDataset.load(Path(cfg.output))
        cfg = existing.with_defaults(cfg)
    carried = [k for k in ("val_fraction", "test_fraction")
               if getattr(given, k) is None and getattr(cfg, k) is not None]
    cfg = replace(cfg, **{
        k: getattr(TILE, k) for k in ("max_nodata", "min_label_fraction", "val_fraction",
                                      "test_fraction") if getattr(cfg, k) is None})
    if cfg.val_fraction < 0 or cfg.test_fraction < 0 or cfg.val_fraction + cfg.test_fraction >= 1:
        source = (f" ({' and '.join('--' + k.replace('_', '-') for k in carried)} from "
                  f"{cfg.output}'s first run)" if carried else "")
        raise UserError(f"--val-fraction {cfg.val_fraction:g} and --test-fraction "
                        f"{cfg.test_fraction:g} must be >= 0 and sum to less than 1{source}")
    out = check_output(cfg.output, cfg.overwrite or existing is not None)
    if cfg.edge not in EDGES:
        raise UserError(f"--edge {cfg.edge}: must be drop or pad")
    if not 0.0 <= cfg.max_nodata <= 1.0:
        raise UserError(f"--max-nodata {cfg.max_nodata}: must be within 0..1")
    if not 0.0 <= cfg.min_label_fraction <= 1.0:
        raise UserError(f"--min-label-fraction {cfg.min_label_fraction}: must be within 0..1")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.class_folders:
        return import_class_folders(cfg, start, existing)

    size = TILE.size if cfg.size is None else cfg.size
    stride = size if cfg.stride is None else cfg.stride
    if size < 1 or stride < 1:
        raise UserError(f"--size {size} / --stride {stride}: both must be at least 1")
    scenes, skipped, already = open_scenes(cfg, existing)
    first = scenes[0]
    crs = first.crs
    from geoexplora.io.labels import open_labels

    try:
        labels = open_labels(cfg.labels, cfg.label_field, cfg.label_raster, crs, cfg.label_layer)
    except UserError as exc:
        if cfg.label_field != given.label_field:  # taken from the existing dataset
            raise UserError(f"{exc} (--label-field {cfg.label_field} is the field {out} was "
                            "tiled with; pass --label-field)") from exc
        raise
    task = cfg.task or _default_task(labels, False)
    _check_task(task, labels)
    if labels is not None:
        _check_labels_overlap(labels, scenes, crs)
    classes = labels.classes if labels is not None and task != "none" else []
    class_lut = None
    if existing is not None:
        existing.check_matches([b.key for b in first.bands], len(first.dates),
                               str(first.paths[0]))
        classes, class_lut = existing.merge_classes(classes)

    cands = make_candidates(scenes, size, stride, cfg.edge)
    n_candidates = len(cands)
    if cfg.aoi:
        _apply_aoi(cands, cfg.aoi, crs)
    if labels is not None and task != "none":
        drop_unlabelled_candidates(cands, labels, crs)
    split_res = first.res[0] if existing is None else existing.split_res()
    if existing is not None and not math.isclose(first.res[0], split_res, rel_tol=1e-6):
        log.warning("%s: %.6g m pixels, %s's chips have %.6g m; pass --resolution %.6g for one "
                    "GSD", first.paths[0].name, first.res[0], existing.root, split_res,
                    split_res)
    block_px = assign_splits(cands, size, split_res, cfg.val_fraction, cfg.test_fraction,
                             cfg.seed, cfg.split_block,
                             existing.block_splits if existing is not None else None)
    # The block size is the dataset's once chips were split by it (or it was asked for): later
    # appends must keep it; until then they may choose.
    split = (cands.split[cands.drop == ""] != "train").any() or cfg.split_block is not None
    recorded_block = block_px if split else None
    if existing is not None:
        existing.drop_overlapping(cands, first.res[0])
    dropped = Counter(r for r in cands.drop if r)
    tasks = make_block_tasks(cands, scenes, size, stride, cfg.workers)
    n_live = sum(len(t.chips) for t in tasks)
    crss = [write_crs(s.crs) for s in scenes]
    if "GDAL_NUM_THREADS" not in os.environ:  # else the user's setting stands
        for scene in scenes:
            scene.decode_threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    plan = Plan(scenes=scenes, crss=crss, labels=labels if classes else None, task=task, size=size,
                max_nodata=cfg.max_nodata, min_label_fraction=cfg.min_label_fraction,
                num_classes=len(classes), class_colors={c.id: c.color for c in classes},
                out=Path(), creation_options=dict(cfg.creation_options or {}),
                samples_per_chip=_samples_per_chip(cfg, n_live, existing), seed=cfg.seed,
                skip_bad=cfg.skip_bad, class_lut=class_lut,
                first_scene_number=existing.next_scene_number() if existing is not None else 0)
    log.info("%d candidate chips of %d px (stride %d) in %d scene(s); %d to read in %d blocks",
             n_candidates, size, stride, len(scenes), n_live, len(tasks))
    if cfg.dry_run:
        for scene in scenes:
            scene.close()
        if n_live == 0:  # as the real run would say
            raise UserError(_zero_chips_message(dropped, n_candidates))
        bands = len(first.bands) * len(first.dates)
        block_bytes = max((4 * bands * t.width * t.height for t in tasks), default=0)
        plan_doc = {
            "scenes": [{"paths": [str(p) for p in sc.paths], "width": sc.width,
                        "height": sc.height, "resolution": list(sc.res), "dates": sc.dates}
                       for sc in scenes],
            "crs": crs.to_string(), "candidates": n_candidates, "to_read": n_live,
            "blocks": len(tasks), "split_block_px": recorded_block,
            "disk_bytes_at_most": n_live * (4 * bands + (task == "segmentation")) * size * size,
            # a block being cut, the next being read (per worker)
            "memory_bytes": 2 * block_bytes * cfg.workers}
        return _planned(out, task, n_live, existing, cands, dropped, classes, first, size,
                        start, skipped, already, plan_doc)

    with atomic_output(out, cfg.overwrite or existing is not None, _appeared_hint(cfg)) as tmp:
        if existing is not None:
            from geoexplora.pipelines.append import link_dataset

            link_dataset(out, tmp)
        (tmp / C.CHIPS_DIR).mkdir(parents=True, exist_ok=True)
        if task == "segmentation":
            (tmp / C.MASKS_DIR).mkdir(exist_ok=True)
        plan.out = tmp
        samples: dict[str, np.ndarray] = {}
        records: list[dict] = []
        class_pixels = np.zeros(max(len(classes), 1), dtype=np.int64)
        for res in run_tasks(run_block, tasks, plan, cfg.workers, "tile",
                             [len(t.chips) for t in tasks], _read_block):
            records.extend(res.records)
            dropped.update(res.dropped)
            class_pixels += res.class_pixels
            samples.update(res.samples)
        if not records:
            raise UserError(_zero_chips_message(dropped, n_candidates))
        new_chips = len(records)
        _add_geometry(records, scenes, crss)
        sources = [os.path.abspath(p) for s in scenes for p in s.paths]
        extra = {"split_block_px": recorded_block, "crs": crs.to_string(),
                 "labels": str(cfg.labels or cfg.label_raster or "") or None}
        dataset = _write_dataset(tmp, cfg, existing, records=records, index_crs=crss[0],
                                 samples=samples, task=task, bands=first.bands,
                                 num_frames=len(first.dates), size=size, classes=classes,
                                 class_pixels=class_pixels, dropped=dropped, sources=sources,
                                 extra=extra)
        for name, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            if fraction > 0 and not dataset["splits"].get(name):
                log.warning("no %s chips: the scenes hold too few split blocks of %d px for "
                            "--%s-fraction %g; pass a smaller --split-block or a larger "
                            "fraction", name, block_px, name, fraction)
    for scene in scenes:
        scene.close()
    return TileResult(output=out, task=task, chips=new_chips, dataset_chips=dataset["chips"],
                      dropped=dict(dropped), splits=dataset["splits"],
                      classes=dataset["classes"], stats=dataset["stats"],
                      bands=[b.key for b in first.bands], num_frames=len(first.dates),
                      chip_size=size, seconds=round(time.perf_counter() - start, 3),
                      skipped_files=skipped, appended=existing is not None,
                      already_in_dataset=already)


def _appeared_hint(cfg: TileConfig) -> str:
    return ("re-run with --append to add to it" if cfg.append
            else "pass --overwrite to replace it")


def _planned(out: Path, task: str, n_live: int, existing, cands: Candidates, dropped: Counter,
             classes: list, first, size: int, start: float, skipped: list, already: list,
             plan_doc: dict) -> TileResult:
    """The dry run's result: what tile would write, from the candidates alone."""
    live = cands.drop == ""
    return TileResult(output=out, task=task, chips=n_live,
                      dataset_chips=n_live + (len(existing.index) if existing is not None else 0),
                      dropped=dict(dropped), splits=dict(Counter(cands.split[live])),
                      classes=[c.to_dict() for c in classes], stats={},
                      bands=[b.key for b in first.bands], num_frames=len(first.dates),
                      chip_size=size, seconds=round(time.perf_counter() - start, 3),
                      skipped_files=skipped, appended=existing is not None,
                      already_in_dataset=already, plan=plan_doc)


def write_crs(crs):
    """The CRS as an EPSG code when rasterio identifies it as one (same projection parameters).

    A CRS given as bare WKT costs GDAL an identification on every file written (~10 ms a chip).
    """
    from rasterio.crs import CRS

    from geoexplora.io.scene import _crs_equivalent

    text = crs.to_string()
    if text.startswith("EPSG:"):
        coded = CRS.from_user_input(text)
        if _crs_equivalent(coded, crs):
            return coded
    return crs


def _add_geometry(records: list[dict], scenes: list, crss: list) -> None:
    from shapely import box

    per_scene = [(c.to_string(), ";".join(os.path.abspath(p) for p in s.paths),
                  ";".join(d or "" for d in s.dates)) for s, c in zip(scenes, crss)]
    for r in records:
        i = r.pop("scene")
        r["geometry"] = box(*C.window_bounds(scenes[i].transform, r["col_off"], r["row_off"],
                                             r["width"], r["height"]))
        r["crs"], r["source"], r["dates"] = per_scene[i]


def _check_labels_overlap(labels, scenes: list, crs) -> None:
    from shapely import box

    lb = box(*_labels_bounds(labels, crs))
    for scene in scenes:
        if lb.intersects(box(*scene.grid.bounds)):
            return
    name = getattr(labels, "path", "labels")
    raise UserError(f"{name}: the labels do not overlap the scenes (labels bounds "
                    f"{_fmt_bounds(lb.bounds)}, first scene {_fmt_bounds(scenes[0].grid.bounds)} "
                    f"in {crs.to_string()}); zero chips")


def _fmt_bounds(b) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in b) + ")"


def _apply_aoi(cands: Candidates, aoi_path, crs) -> None:
    import geopandas as gpd
    import shapely

    try:
        aoi = gpd.read_file(aoi_path)
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise UserError(f"--aoi {aoi_path}: not a readable vector file "
                        f"({str(exc).splitlines()[0]})") from exc
    if aoi.empty or aoi.crs is None:
        raise UserError(f"--aoi {aoi_path}: empty or without a CRS")
    area = aoi.to_crs(crs.to_wkt()).union_all()
    live = np.flatnonzero(cands.drop == "")
    inside = shapely.intersects(cands.boxes[live], area)
    cands.drop[live[~inside]] = "outside_aoi"


# ----------------------------------------------------------------------------- class folders

@dataclass
class PatchPlan:
    """What workers need to import class-folder patches."""

    bands: list[str]
    band_keys: list[str]
    num_frames: int
    size: int
    size_given: bool
    size_from: str  # what fixed the size, for messages
    scene_options: object
    out: Path
    creation_options: dict[str, str]
    samples_per_chip: int
    seed: int
    skip_bad: bool


@dataclass
class PatchTask:
    index: int
    patches: list[tuple[str, int, str, str]]  # (path, class id, split, chip id)


def import_class_folders(cfg: TileConfig, start: float, existing=None) -> TileResult:
    """``DIR/<class>/*.tif`` (EuroSAT / UC Merced style) -> a classification chips dataset.

    Each file is one chip, kept in its own CRS (the index geometry is in EPSG:4326); patches of
    another size are centre-cropped/padded to ``size`` when ``size`` is given, else refused.
    Splits are drawn per class (stratified) with ``seed``. With ``existing`` (append), files
    already in it are skipped and class ids follow its classes.
    """
    from geoexplora.io.labels import LabelClass, _natural_key
    from geoexplora.io.outputs import atomic_output
    from geoexplora.io.scene import RASTER_SUFFIXES, open_scene

    if len(cfg.inputs) != 1:
        raise UserError(f"--class-folders takes one root folder (DIR/<class>/*.tif), "
                        f"got {len(cfg.inputs)} inputs")
    if cfg.labels or cfg.label_raster:
        raise UserError("--class-folders takes the classes from the folder names; drop "
                        "--labels/--label-raster")
    if (cfg.task or "classification") != "classification":
        raise UserError(f"--task {cfg.task}: class folders make a classification dataset")
    gridding = [name for name, value in (("--crs", cfg.crs), ("--stride", cfg.stride),
                                         ("--split-block", cfg.split_block), ("--aoi", cfg.aoi))
                if value is not None]
    if gridding:
        raise UserError(f"{', '.join(gridding)}: not for --class-folders (each file is one chip, "
                        "kept in its own CRS; splits are drawn per class)")
    root = Path(cfg.inputs[0])
    if not root.is_dir():
        raise UserError(f"--class-folders {root}: not a folder")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: _natural_key(d.name))
    if not class_dirs:
        raise UserError(f"{root}: holds no class folders (expected {root}/<class>/*.tif)")
    files: dict[int, list[Path]] = {}
    for i, d in enumerate(class_dirs):
        files[i] = sorted(f for f in d.rglob("*")
                          if f.is_file() and f.suffix.lower() in RASTER_SUFFIXES)
        if not files[i]:
            raise UserError(f"{d}: class folder holds no raster files")
    classes = [LabelClass(i, d.name, C.class_color(i)) for i, d in enumerate(class_dirs)]
    class_ids = np.arange(len(classes))
    already: list[str] = []
    if existing is not None:
        classes, class_ids = existing.merge_classes(classes)
        known = existing.known_sources()
        already = [str(f) for paths in files.values() for f in paths if f.resolve() in known]
        files = {i: kept for i, paths in files.items()
                 if (kept := [f for f in paths if f.resolve() not in known])}
        if not files:
            raise UserError(f"nothing to append: every patch in {root} is already in "
                            f"{existing.root}")
        if already:
            log.warning("%d patch file(s) already in %s, skipped", len(already), existing.root)
    example = next(iter(files.values()))[0]
    opts = scene_options_from(cfg)
    first = open_scene([example], opts)
    if existing is not None:
        existing.check_matches([b.key for b in first.bands], len(first.dates), str(example))
    size = cfg.size or (existing.meta["chip_size"] if existing is not None else first.width)
    if cfg.size is None and existing is None and first.width != first.height:
        raise UserError(f"{example}: {first.width} x {first.height} px patches are not "
                        "square; pass --size to centre-crop/pad them")
    rng = np.random.default_rng(cfg.seed)
    patches = []
    for i, paths in files.items():
        cid = int(class_ids[i])
        order = rng.permutation(len(paths))
        n_test = round(cfg.test_fraction * len(paths))
        n_val = round(cfg.val_fraction * len(paths))
        for rank, k in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            patches.append((str(paths[k]), cid, split, f"c{cid:03d}_{_safe(paths[k].stem)}"))
    patches.sort(key=lambda p: p[3])
    if len({p[3] for p in patches}) != len(patches):
        raise UserError(f"{root}: two files of one class folder share a name stem")
    if existing is not None:
        taken = existing.chip_ids()
        clash = next((p for p in patches if p[3] in taken), None)
        if clash is not None:
            raise UserError(f"{clash[0]}: {existing.root} already has a chip {clash[3]} (another "
                            "file of that name in that class); rename the file")
    batch = 64
    tasks = [PatchTask(i // batch, patches[i:i + batch]) for i in range(0, len(patches), batch)]
    plan = PatchPlan(bands=[b.name for b in first.bands], band_keys=[b.key for b in first.bands],
                     num_frames=len(first.dates), size=size, size_given=cfg.size is not None,
                     size_from=(f"{existing.root}'s chips are" if existing is not None
                                else "the first patch is"),
                     scene_options=opts, out=Path(),
                     creation_options=dict(cfg.creation_options or {}),
                     samples_per_chip=_samples_per_chip(cfg, len(patches), existing),
                     seed=cfg.seed, skip_bad=cfg.skip_bad)
    first.close()
    out = Path(cfg.output)
    dropped: Counter = Counter()
    skipped: list[str] = []
    if cfg.dry_run:
        bands = len(plan.band_keys) * plan.num_frames
        return TileResult(
            output=out, task="classification", chips=len(patches),
            dataset_chips=len(patches) + (len(existing.index) if existing is not None else 0),
            dropped={}, splits=dict(Counter(p[2] for p in patches)),
            classes=[c.to_dict() for c in classes], stats={}, bands=plan.band_keys,
            num_frames=plan.num_frames, chip_size=size,
            seconds=round(time.perf_counter() - start, 3), appended=existing is not None,
            already_in_dataset=already,
            plan={"root": str(root), "patches": len(patches),
                  "disk_bytes_at_most": len(patches) * 4 * bands * size * size})
    with atomic_output(out, cfg.overwrite or existing is not None, _appeared_hint(cfg)) as tmp:
        if existing is not None:
            from geoexplora.pipelines.append import link_dataset

            link_dataset(out, tmp)
        (tmp / C.CHIPS_DIR).mkdir(parents=True, exist_ok=True)
        plan.out = tmp
        samples: dict[str, np.ndarray] = {}
        records: list[dict] = []
        for res in run_tasks(run_patches, tasks, plan, cfg.workers, "import",
                             [len(t.patches) for t in tasks]):
            records.extend(res.records)
            dropped.update(res.dropped)
            skipped.extend(res.skipped)
            samples.update(res.samples)
        if not records:
            raise UserError(_zero_chips_message(dropped, len(patches)))
        new_chips = len(records)
        dataset = _write_dataset(tmp, cfg, existing, records=records, index_crs="EPSG:4326",
                                 samples=samples, task="classification",
                                 bands=[band_from_key(k) for k in plan.band_keys],
                                 num_frames=plan.num_frames, size=size, classes=classes,
                                 class_pixels=None, dropped=dropped, sources=[os.path.abspath(root)],
                                 extra={"skipped": skipped})
    return TileResult(output=out, task="classification", chips=new_chips,
                      dataset_chips=dataset["chips"], dropped=dict(dropped),
                      splits=dataset["splits"], classes=dataset["classes"],
                      stats=dataset["stats"], bands=plan.band_keys, num_frames=plan.num_frames,
                      chip_size=size, seconds=round(time.perf_counter() - start, 3),
                      skipped_files=skipped, appended=existing is not None,
                      already_in_dataset=already)


def _safe(stem: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)


@dataclass
class PatchResult(BlockResult):
    skipped: list[str] = field(default_factory=list)


def run_patches(task: PatchTask) -> PatchResult:
    """Read, check, crop/pad and write one batch of class-folder patches."""
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window
    from shapely import box

    from geoexplora.io.scene import open_scene

    plan = _PLAN
    records, samples, skipped = [], {}, []
    dropped: Counter = Counter()
    for path, class_id, split, cid in task.patches:
        try:
            scene = open_scene([path], plan.scene_options)
            if [b.key for b in scene.bands] != plan.band_keys:
                raise UserError(f"{path}: bands {','.join(b.key for b in scene.bands)} differ "
                                f"from the first patch's {','.join(plan.band_keys)}")
            if not plan.size_given and (scene.width, scene.height) != (plan.size, plan.size):
                raise UserError(f"{path}: {scene.width} x {scene.height} px, {plan.size_from} "
                                f"{plan.size} x {plan.size}; pass --size to centre-crop/pad")
            col, row = (scene.width - plan.size) // 2, (scene.height - plan.size) // 2
            window = Window(col, row, plan.size, plan.size)
            data = scene.read(window)
        except (UserError, rasterio.errors.RasterioError) as exc:
            if not plan.skip_bad:
                if isinstance(exc, UserError):
                    raise
                raise UserError(f"{path}: read failed ({str(exc).splitlines()[0]})") from exc
            log.warning("skipped (--skip-bad): %s", exc)
            skipped.append(path)
            dropped["unreadable"] += 1
            continue
        valid = np.isfinite(data).all(axis=1).any(axis=0)
        nodata_fraction = 1.0 - float(valid.mean())
        if nodata_fraction >= 1.0:
            dropped["nodata"] += 1
            continue
        transform = C.window_transform(scene.transform, col, row)
        chip_path = f"{C.CHIPS_DIR}/{cid}.tif"
        C.write_chip(plan.out / chip_path, data, transform, scene.crs, scene.bands, scene.dates,
                     plan.creation_options)
        footprint = box(*transform_bounds(scene.crs, "EPSG:4326",
                                          *C.window_bounds(scene.transform, col, row, plan.size,
                                                           plan.size)))
        samples[cid] = pixel_sample(data, plan.samples_per_chip, _chip_rng(plan.seed, cid))
        records.append({
            "chip_id": cid, "path": chip_path, "mask_path": None, "geometry": footprint,
            "crs": scene.crs.to_string(), "source": os.path.abspath(path), "col_off": col, "row_off": row,
            "width": plan.size, "height": plan.size,
            "dates": ";".join(d or "" for d in scene.dates), "label": class_id,
            "labels": str(class_id), "nodata_fraction": nodata_fraction, "split": split})
        scene.close()
    return PatchResult(records, samples, dropped, np.zeros(1, np.int64), skipped)
