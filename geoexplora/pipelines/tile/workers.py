"""The work: blocks of chips read once and cut in memory, inline or in worker processes."""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoexplora.errors import UserError
from geoexplora.io import chips as C
from geoexplora.io.stats import pixel_sample
from geoexplora.pipelines.tile.config import BLOCK_BUDGET_BYTES, TileConfig
from geoexplora.pipelines.tile.grid import Candidates

log = logging.getLogger("geoexplora")


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
    samples: dict[str, np.ndarray]  # chip id -> pixel sample (see chip_rng)
    dropped: Counter
    class_pixels: np.ndarray


_PLAN: Plan | None = None


def init_worker(plan: Plan) -> None:
    global _PLAN
    _PLAN = plan


def worker_plan() -> Plan:
    """The plan :func:`init_worker` gave this process (or, inline, this run)."""
    assert _PLAN is not None, "init_worker was not called"
    return _PLAN


def make_block_tasks(
    cands: Candidates, scenes: list, size: int, stride: int, workers: int = 1
) -> list[BlockTask]:
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
        col_groups = [cols[i : i + span_cols] for i in range(0, cols.size, span_cols)]
        for cg in col_groups:
            width = int(cg[-1] - cg[0] + size)
            span_rows = max(1, (px_budget // width - size) // stride + 1)
            in_cols = mine[(cands.col[mine] >= cg[0]) & (cands.col[mine] <= cg[-1])]
            for i in range(0, rows.size, span_rows):
                rg = rows[i : i + span_rows]
                sel = in_cols[(cands.row[in_cols] >= rg[0]) & (cands.row[in_cols] <= rg[-1])]
                if sel.size == 0:
                    continue
                r0, c0 = int(cands.row[sel].min()), int(cands.col[sel].min())
                tasks.append(
                    BlockTask(
                        len(tasks),
                        s,
                        r0,
                        c0,
                        int(cands.row[sel].max() - r0 + size),
                        int(cands.col[sel].max() - c0 + size),
                        [(int(cands.row[k]), int(cands.col[k]), str(cands.split[k])) for k in sel],
                    )
                )
    return tasks


def chip_id(scene: int, row: int, col: int) -> str:
    return f"s{scene:03d}_r{row:06d}_c{col:06d}"


def read_block(plan: Plan, task: BlockTask):
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
    ``read_block``'s result, None when unreadable)."""
    from rasterio.windows import Window

    plan = worker_plan()
    scene = plan.scenes[task.scene]
    size = plan.size
    dropped: Counter = Counter()
    class_pixels = np.zeros(max(plan.num_classes, 1), dtype=np.int64)
    records, samples = [], {}
    if block is _NOT_READ:
        block = read_block(plan, task)
    if block is None:
        dropped["unreadable"] += len(task.chips)
        return BlockResult([], {}, dropped, class_pixels)
    block_window = Window(task.col0, task.row0, task.width, task.height)
    label_block = (
        plan.labels.read_mask(scene.grid, block_window)
        if plan.labels is not None and plan.task != "none"
        else None
    )
    if label_block is not None and plan.class_lut is not None:
        label_block = plan.class_lut[label_block]
    valid_block = np.isfinite(block).all(axis=1).any(axis=0)  # a pixel is valid on some date
    for row, col, split in task.chips:
        r, c = row - task.row0, col - task.col0
        data = block[:, :, r : r + size, c : c + size]
        valid = valid_block[r : r + size, c : c + size]
        nodata_fraction = 1.0 - float(valid.mean())
        if nodata_fraction > plan.max_nodata or nodata_fraction >= 1.0:
            dropped["nodata"] += 1
            continue
        label, present, mask = C.NO_LABEL, [], None
        if label_block is not None:
            mask = np.where(valid, label_block[r : r + size, c : c + size], C.IGNORE_INDEX)
            counts = np.bincount(mask[mask != C.IGNORE_INDEX].ravel(), minlength=plan.num_classes)
            share = counts / float(size * size)
            if counts.sum() and share.max() >= plan.min_label_fraction:
                label = int(counts.argmax())
            present = [
                int(k) for k in np.flatnonzero((counts > 0) & (share >= plan.min_label_fraction))
            ]
            unlabelled = {
                "classification": label == C.NO_LABEL,
                "multilabel": not present,
                "segmentation": counts.sum() == 0,
            }[plan.task]
            if unlabelled:
                dropped["unlabelled"] += 1
                continue
            class_pixels += counts
        cid = chip_id(plan.first_scene_number + task.scene, row, col)
        transform = C.window_transform(scene.transform, col, row)
        chip_path = f"{C.CHIPS_DIR}/{cid}.tif"
        data = np.ascontiguousarray(data)  # one copy, for the file and the pixel sample
        C.write_chip(
            plan.out / chip_path,
            data,
            transform,
            plan.crss[task.scene],
            scene.bands,
            scene.dates,
            plan.creation_options,
        )
        mask_path = None
        if mask is not None and plan.task == "segmentation":
            mask_path = f"{C.MASKS_DIR}/{cid}.tif"
            C.write_mask(
                plan.out / mask_path,
                mask.astype(np.uint8),
                transform,
                plan.crss[task.scene],
                plan.class_colors,
                plan.creation_options,
            )
        samples[cid] = pixel_sample(data, plan.samples_per_chip, chip_rng(plan.seed, cid))
        records.append(
            {
                "chip_id": cid,
                "path": chip_path,
                "mask_path": mask_path,
                "scene": task.scene,
                "col_off": col,
                "row_off": row,
                "width": size,
                "height": size,
                "label": label,
                "labels": ";".join(map(str, present)),
                "nodata_fraction": nodata_fraction,
                "split": split,
            }
        )
    return BlockResult(records, samples, dropped, class_pixels)


def chip_rng(seed: int, cid: str) -> np.random.Generator:
    """A generator per chip: statistics do not depend on how chips were grouped or ordered."""
    return np.random.default_rng((seed, zlib.crc32(cid.encode())))


def samples_per_chip(cfg: TileConfig, new_chips: int, existing) -> int:
    """Pixels sampled per chip so that all chips (old ones too) give ~``stats_samples``."""
    total = new_chips + (len(existing.index) if existing is not None else 0)
    return max(16, math.ceil(cfg.stats_samples / max(total, 1)))


def run_tasks(
    fn, tasks: list, plan, workers: int, description: str, weights: list[int], read_ahead=None
):
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
            init_worker(plan)
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

        with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(plan,)) as pool:
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
