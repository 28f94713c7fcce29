"""Class folders (``DIR/<class>/*.tif``, EuroSAT / UC Merced style) -> a classification dataset."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geoexplora.bands import band_from_key
from geoexplora.errors import UserError, opt
from geoexplora.io import chips as C
from geoexplora.io.stats import pixel_sample
from geoexplora.pipelines.tile.config import TileConfig, TileResult
from geoexplora.pipelines.tile.scenes import scene_options_from
from geoexplora.pipelines.tile.workers import (
    BlockResult,
    chip_rng,
    run_tasks,
    samples_per_chip,
    worker_plan,
)
from geoexplora.pipelines.tile.writer import appeared_hint, write_dataset, zero_chips_message

log = logging.getLogger("geoexplora")


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
    from geoexplora.io.scene import open_scene

    root = _check_options(cfg)
    found = find_class_files(root, existing)
    example = next(iter(found.files.values()))[0]
    opts = scene_options_from(cfg)
    first = open_scene([example], opts)
    if existing is not None:
        existing.check_matches([b.key for b in first.bands], len(first.dates), str(example))
    size = cfg.size or (existing.meta["chip_size"] if existing is not None else first.width)
    if cfg.size is None and existing is None and first.width != first.height:
        raise UserError(
            f"{example}: {first.width} x {first.height} px patches are not "
            f"square; pass {opt('size')} to centre-crop/pad them"
        )
    patches = draw_splits(found, cfg.val_fraction, cfg.test_fraction, cfg.seed, root, existing)
    plan = PatchPlan(
        bands=[b.name for b in first.bands],
        band_keys=[b.key for b in first.bands],
        num_frames=len(first.dates),
        size=size,
        size_given=cfg.size is not None,
        size_from=(
            f"{existing.root}'s chips are" if existing is not None else "the first patch is"
        ),
        scene_options=opts,
        out=Path(),
        creation_options=dict(cfg.creation_options or {}),
        samples_per_chip=samples_per_chip(cfg, len(patches), existing),
        seed=cfg.seed,
        skip_bad=cfg.skip_bad,
    )
    first.close()
    common = {
        "output": Path(cfg.output),
        "task": "classification",
        "bands": plan.band_keys,
        "num_frames": plan.num_frames,
        "chip_size": size,
        "appended": existing is not None,
        "already_in_dataset": found.already,
    }
    if cfg.dry_run:
        bands = len(plan.band_keys) * plan.num_frames
        return TileResult(
            chips=len(patches),
            dataset_chips=len(patches) + (len(existing.index) if existing is not None else 0),
            dropped={},
            splits=dict(Counter(p[2] for p in patches)),
            classes=[c.to_dict() for c in found.classes],
            stats={},
            seconds=round(time.perf_counter() - start, 3),
            plan={
                "root": str(root),
                "patches": len(patches),
                "disk_bytes_at_most": len(patches) * 4 * bands * size * size,
            },
            **common,
        )
    records, dataset, dropped, skipped = _write(cfg, plan, patches, found.classes, root, existing)
    return TileResult(
        chips=len(records),
        dataset_chips=dataset["chips"],
        dropped=dict(dropped),
        splits=dataset["splits"],
        classes=dataset["classes"],
        stats=dataset["stats"],
        seconds=round(time.perf_counter() - start, 3),
        skipped_files=skipped,
        **common,
    )


def _check_options(cfg: TileConfig) -> Path:
    """The one root folder, with no option that only makes sense for scenes."""
    if len(cfg.inputs) != 1:
        raise UserError(
            f"{opt('class_folders')} takes one root folder (DIR/<class>/*.tif), "
            f"got {len(cfg.inputs)} inputs"
        )
    if cfg.labels or cfg.label_raster:
        raise UserError(
            f"{opt('class_folders')} takes the classes from the folder names; drop "
            f"{opt('labels')}/{opt('label_raster')}"
        )
    if (cfg.task or "classification") != "classification":
        raise UserError(f"{opt('task')} {cfg.task}: class folders make a classification dataset")
    gridding = [
        name
        for name, value in (
            ("--crs", cfg.crs),
            ("--stride", cfg.stride),
            ("--split-block", cfg.split_block),
            ("--aoi", cfg.aoi),
        )
        if value is not None
    ]
    if gridding:
        raise UserError(
            f"{', '.join(gridding)}: not for {opt('class_folders')} (each file is one chip, "
            "kept in its own CRS; splits are drawn per class)"
        )
    root = Path(cfg.inputs[0])
    if not root.is_dir():
        raise UserError(f"{opt('class_folders')} {root}: not a folder")
    return root


@dataclass
class ClassFiles:
    """The class folders found: classes (the dataset's ids when appending), each class's
    files (those not yet in the dataset), and the files skipped as already in it."""

    classes: list
    class_ids: np.ndarray  # folder order -> dataset class id
    files: dict[int, list[Path]]  # folder order -> its raster files
    already: list[str]


def find_class_files(root: Path, existing=None) -> ClassFiles:
    """Class folders in natural order (``class2`` before ``class10``), each with its rasters."""
    from geoexplora.io.labels import LabelClass, natural_key
    from geoexplora.io.scene import RASTER_SUFFIXES

    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: natural_key(d.name),
    )
    if not class_dirs:
        raise UserError(f"{root}: holds no class folders (expected {root}/<class>/*.tif)")
    files: dict[int, list[Path]] = {}
    for i, d in enumerate(class_dirs):
        files[i] = sorted(
            f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in RASTER_SUFFIXES
        )
        if not files[i]:
            raise UserError(f"{d}: class folder holds no raster files")
    classes = [LabelClass(i, d.name, C.class_color(i)) for i, d in enumerate(class_dirs)]
    class_ids = np.arange(len(classes))
    already: list[str] = []
    if existing is not None:
        classes, class_ids = existing.merge_classes(classes)
        known = existing.known_sources()
        already = [str(f) for paths in files.values() for f in paths if f.resolve() in known]
        files = {
            i: kept
            for i, paths in files.items()
            if (kept := [f for f in paths if f.resolve() not in known])
        }
        if not files:
            raise UserError(
                f"nothing to append: every patch in {root} is already in {existing.root}"
            )
        if already:
            log.warning("%d patch file(s) already in %s, skipped", len(already), existing.root)
    return ClassFiles(classes, class_ids, files, already)


def draw_splits(
    found: ClassFiles,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    root: Path,
    existing=None,
) -> list[tuple[str, int, str, str]]:
    """``(path, class id, split, chip id)`` per patch, in chip-id order; splits drawn per class
    (``round(fraction x files)`` of each), so every class is in every split it can be."""
    rng = np.random.default_rng(seed)
    patches = []
    for i, paths in found.files.items():
        cid = int(found.class_ids[i])
        order = rng.permutation(len(paths))
        n_test = round(test_fraction * len(paths))
        n_val = round(val_fraction * len(paths))
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
            raise UserError(
                f"{clash[0]}: {existing.root} already has a chip {clash[3]} (another "
                "file of that name in that class); rename the file"
            )
    return patches


PATCHES_PER_TASK = 64


def _write(
    cfg: TileConfig, plan: PatchPlan, patches: list, classes: list, root: Path, existing
) -> tuple[list[dict], dict, Counter, list[str]]:
    """Write the patches as chips (in a temporary folder renamed into place): the records, the
    dataset document, the drops and the files skipped as unreadable."""
    from geoexplora.io.outputs import atomic_output

    out = Path(cfg.output)
    tasks = [
        PatchTask(i // PATCHES_PER_TASK, patches[i : i + PATCHES_PER_TASK])
        for i in range(0, len(patches), PATCHES_PER_TASK)
    ]
    dropped: Counter = Counter()
    skipped: list[str] = []
    with atomic_output(out, cfg.overwrite or existing is not None, appeared_hint(cfg)) as tmp:
        if existing is not None:
            from geoexplora.pipelines.append import link_dataset

            link_dataset(out, tmp)
        (tmp / C.CHIPS_DIR).mkdir(parents=True, exist_ok=True)
        plan.out = tmp
        samples: dict[str, np.ndarray] = {}
        records: list[dict] = []
        for res in run_tasks(
            run_patches, tasks, plan, cfg.workers, "import", [len(t.patches) for t in tasks]
        ):
            records.extend(res.records)
            dropped.update(res.dropped)
            skipped.extend(res.skipped)
            samples.update(res.samples)
        if not records:
            raise UserError(zero_chips_message(dropped, len(patches)))
        dataset = write_dataset(
            tmp,
            cfg,
            existing,
            records=records,
            index_crs="EPSG:4326",
            samples=samples,
            task="classification",
            bands=[band_from_key(k) for k in plan.band_keys],
            num_frames=plan.num_frames,
            size=plan.size,
            classes=classes,
            class_pixels=None,
            dropped=dropped,
            sources=[os.path.abspath(root)],
            extra={"skipped": skipped},
        )
    return records, dataset, dropped, skipped


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

    plan = worker_plan()
    records, samples, skipped = [], {}, []
    dropped: Counter = Counter()
    for path, class_id, split, cid in task.patches:
        try:
            scene = open_scene([path], plan.scene_options)
            if [b.key for b in scene.bands] != plan.band_keys:
                raise UserError(
                    f"{path}: bands {','.join(b.key for b in scene.bands)} differ "
                    f"from the first patch's {','.join(plan.band_keys)}"
                )
            if not plan.size_given and (scene.width, scene.height) != (plan.size, plan.size):
                raise UserError(
                    f"{path}: {scene.width} x {scene.height} px, {plan.size_from} "
                    f"{plan.size} x {plan.size}; pass {opt('size')} to centre-crop/pad"
                )
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
        C.write_chip(
            plan.out / chip_path,
            data,
            transform,
            scene.crs,
            scene.bands,
            scene.dates,
            plan.creation_options,
        )
        footprint = box(
            *transform_bounds(
                scene.crs,
                "EPSG:4326",
                *C.window_bounds(scene.transform, col, row, plan.size, plan.size),
            )
        )
        samples[cid] = pixel_sample(data, plan.samples_per_chip, chip_rng(plan.seed, cid))
        records.append(
            {
                "chip_id": cid,
                "path": chip_path,
                "mask_path": None,
                "geometry": footprint,
                "crs": scene.crs.to_string(),
                "source": os.path.abspath(path),
                "col_off": col,
                "row_off": row,
                "width": plan.size,
                "height": plan.size,
                "dates": ";".join(d or "" for d in scene.dates),
                "label": class_id,
                "labels": str(class_id),
                "nodata_fraction": nodata_fraction,
                "split": split,
            }
        )
        scene.close()
    return PatchResult(records, samples, dropped, np.zeros(1, np.int64), skipped)
