"""Configuration and result of ``tile``."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geoexplora.config_checks import path_list
from geoexplora.log import Progress

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
    task: str | None = None  # default from the labels: see default_task
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
