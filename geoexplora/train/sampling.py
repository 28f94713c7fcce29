"""Training samples from scenes (random windows, weighted by valid area) or from a chips dataset.

Both are map-style datasets over *global sample indices* (see :mod:`geoexplora.train.engine`):
sample ``i`` is drawn with its own generator ``sample_rng(seed, i)``, so it is the same in any
worker, on any rank, before and after a resume. Each sample is ``{"image": float32 (T, C, H, W)
canonical units, NaN = nodata, "days": (T,) days since 1970 (temporal inputs only), **views}``
where ``views`` come from a ``prepare(rng, image)`` callable (the objective's crops and masks).

Windows from scenes: each scene (each date of it, for single-date models) is cut into cells; a
cell's weight is its valid (non-nodata) area, measured once by reading the cells one at a time
(memory bounded by a cell). A sample picks a cell by weight, a window centred in it, and
retries (up to :data:`MAX_TRIES`) while the window has less than ``min_valid`` valid pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from geoexplora.defaults import DATA
from geoexplora.errors import UserError, opt
from geoexplora.train.engine import EpochIndex, sample_rng

MAX_TRIES = 20
Prepare = Callable[[np.random.Generator, np.ndarray], dict]


def single_date_scenes(scene) -> list:
    """A T-date scene as T single-date scenes (reads only the date it needs)."""
    from geoexplora.io.scene import Scene

    if len(scene.dates) == 1:
        return [scene]
    return [Scene([frame], scene.grid, [date]) for frame, date in zip(scene.sources, scene.dates)]


def _days(dates: list[str | None]) -> torch.Tensor:
    from geoexplora.models.temporal import days_since_epoch

    return torch.tensor(days_since_epoch(dates), dtype=torch.float32)


@dataclass(frozen=True)
class Cell:
    scene: int
    row: int
    col: int
    height: int
    width: int


def valid_fraction(data: np.ndarray) -> float:
    """Fraction of pixels of a ``(T, C, h, w)`` window valid (all bands finite) in every frame."""
    return float(np.isfinite(data).all(axis=1).all(axis=0).mean()) if data.size else 0.0


class SceneWindows:
    """Random ``size`` x ``size`` windows of ``frames`` dates across ``scenes``."""

    def __init__(
        self,
        scenes: list,
        size: int,
        seed: int,
        prepare: Prepare | None = None,
        frames: int = 1,
        min_valid: float = DATA.min_valid_fraction,
        cell: int | None = None,
        progress=None,
    ):
        if frames == 1:
            scenes = [s for scene in scenes for s in single_date_scenes(scene)]
        for scene in scenes:
            name = ", ".join(p.name for p in scene.paths)
            if scene.width < size or scene.height < size:
                raise UserError(
                    f"{name}: {scene.width}x{scene.height} px is smaller than the "
                    f"{size} px training window; use larger scenes or a smaller "
                    f"{opt('crop_size')}"
                )
            if len(scene.dates) != frames:
                raise UserError(
                    f"{name}: {len(scene.dates)} date(s), the model takes {frames} "
                    f"({opt('frames')})"
                )
        self.scenes, self.size, self.seed = scenes, size, seed
        self.prepare, self.frames, self.min_valid = prepare, frames, min_valid
        self.cell = max(size, cell or DATA.valid_map_cell)
        self.cells, weights = self._measure(progress)
        total = weights.sum()
        if not total > 0:
            names = ", ".join(sorted({p.name for s in scenes for p in s.paths}))
            raise UserError(
                f"no valid pixels in {names}: every pixel is nodata in at least one "
                "of the requested bands"
            )
        self.probs = weights / total
        self.valid_pixels = int(total)

    def _measure(self, progress) -> tuple[list[Cell], np.ndarray]:
        from rasterio.windows import Window

        cells, weights = [], []
        for k, scene in enumerate(self.scenes):
            for row in range(0, scene.height, self.cell):
                for col in range(0, scene.width, self.cell):
                    h, w = min(self.cell, scene.height - row), min(self.cell, scene.width - col)
                    data = scene.read(Window(col, row, w, h))
                    cells.append(Cell(k, row, col, h, w))
                    weights.append(valid_fraction(data) * h * w)
            if progress is not None:
                progress(k + 1, len(self.scenes))
        return cells, np.asarray(weights, dtype=np.float64)

    def close(self) -> None:
        """Close every scene's files (a run that opened them ends with this)."""
        for scene in self.scenes:
            scene.close()

    def __len__(self) -> int:  # a stream: any index is valid; this is its natural size
        return max(1, self.valid_pixels // (self.size * self.size))

    def draw_window(self, rng: np.random.Generator) -> tuple[np.ndarray, list]:
        """A ``(T, C, size, size)`` window (and its dates) with enough valid pixels."""
        from rasterio.windows import Window

        best = None
        for _ in range(MAX_TRIES):
            cell = self.cells[int(rng.choice(len(self.cells), p=self.probs))]
            scene = self.scenes[cell.scene]
            cy = cell.row + rng.uniform(0, cell.height)
            cx = cell.col + rng.uniform(0, cell.width)
            top = int(np.clip(round(cy - self.size / 2), 0, scene.height - self.size))
            left = int(np.clip(round(cx - self.size / 2), 0, scene.width - self.size))
            data = scene.read(Window(left, top, self.size, self.size))
            fraction = valid_fraction(data)
            if best is None or fraction > best[0]:
                best = (fraction, data, scene.dates)
            if fraction >= self.min_valid:
                break
        return best[1], list(best[2])

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, index)
        image, dates = self.draw_window(rng)
        sample = {"image": torch.from_numpy(image)}
        if self.frames > 1:
            sample["days"] = _days(dates)
        if self.prepare is not None:
            sample.update(self.prepare(rng, image))
        return sample

    def pixel_stream(self, windows: int, seed: int, per_window: int = 4096):
        """``(n, C)`` pixel samples of ``windows`` random windows (for band statistics)."""
        from geoexplora.io.stats import pixel_sample

        rng = np.random.default_rng([seed, 0x57A7])
        for _ in range(windows):
            image, _ = self.draw_window(rng)
            yield pixel_sample(image, per_window, rng)


class ChipSamples:
    """The chips of a chips dataset as a stream (a seeded permutation per epoch), with the
    bands selected by ``band_indices``."""

    def __init__(self, chips, band_indices: list[int], seed: int, prepare: Prepare | None = None):
        if len(chips) == 0:
            raise UserError(
                f"{chips.root}: the chips dataset has no chips"
                + (f" in split {chips.split}" if chips.split else "")
            )
        self.chips, self.band_indices = chips, list(band_indices)
        self.seed, self.prepare = seed, prepare
        self.frames = chips.num_frames
        self.order = EpochIndex(len(chips), seed)

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict:
        _, item = self.order.epoch_and_item(index)
        image = np.ascontiguousarray(self.chips.read_image(item)[:, self.band_indices])
        sample = {"image": torch.from_numpy(image)}
        if self.frames > 1:
            sample["days"] = _days(self.chips.dates(item))
        if self.prepare is not None:
            sample.update(self.prepare(sample_rng(self.seed, index), image))
        return sample
