"""Robust per-band statistics of pixel samples (canonical units, NaN = nodata).

Used by ``tile`` (dataset statistics stored in ``dataset.json``) and by ``adapt`` (statistics of
scenes). Mean and standard deviation are exact over every valid value seen (accumulated in
float64); the 2nd/98th percentiles come from a uniform reservoir sample of at most
``max_samples`` values per band, so memory stays bounded however many pixels stream through.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from geoexplora.errors import UserError


class BandStatsAccumulator:
    """Streaming per-band statistics: feed ``(N, C)`` arrays, read ``result()``.

    Each band is reduced over its own finite values (a NaN in one band does not discard the
    other bands of that pixel).
    """

    def __init__(self, num_bands: int, max_samples: int = 200_000, seed: int = 0):
        self.num_bands = num_bands
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self._count = np.zeros(num_bands, dtype=np.int64)
        self._sum = np.zeros(num_bands, dtype=np.float64)
        self._sumsq = np.zeros(num_bands, dtype=np.float64)
        self._shift: np.ndarray | None = None  # first values seen: keeps the variance sums stable
        self._reservoirs = [np.empty(0, dtype=np.float32) for _ in range(num_bands)]
        self._seen = np.zeros(num_bands, dtype=np.int64)

    def update(self, sample: np.ndarray) -> None:
        sample = np.asarray(sample, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[1] != self.num_bands:
            raise ValueError(f"expected an (N, {self.num_bands}) array, got {sample.shape}")
        for c in range(self.num_bands):
            values = sample[:, c]
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            if self._shift is None:
                self._shift = np.full(self.num_bands, np.nan)
            if np.isnan(self._shift[c]):
                self._shift[c] = float(values[0])
            centred = values.astype(np.float64) - self._shift[c]
            self._count[c] += values.size
            self._sum[c] += centred.sum()
            self._sumsq[c] += np.square(centred).sum()
            self._reservoir_add(c, values)

    def _reservoir_add(self, c: int, values: np.ndarray) -> None:
        """Uniform sample without replacement of all values seen (vectorised Algorithm R)."""
        res = self._reservoirs[c]
        seen = self._seen[c]
        room = self.max_samples - res.size
        if room > 0:
            taken = values[:room]
            res = np.concatenate([res, taken])
            seen += taken.size
            values = values[taken.size :]
        if values.size:
            positions = seen + np.arange(1, values.size + 1)
            slots = (self._rng.random(values.size) * positions).astype(np.int64)
            keep = slots < self.max_samples
            # Later values overwrite earlier ones in the same slot, as in the sequential algorithm.
            res[slots[keep]] = values[keep]
            seen += values.size
        self._reservoirs[c] = res
        self._seen[c] = seen

    def result(self) -> dict[str, list[float]]:
        empty = [i for i in range(self.num_bands) if self._count[i] == 0]
        if empty:
            raise UserError(
                f"no valid pixels to compute statistics of band(s) "
                f"{', '.join(str(i + 1) for i in empty)}"
            )
        n = self._count.astype(np.float64)
        mean_c = self._sum / n
        assert self._shift is not None  # set by the first valid value; every band has one here
        var = np.maximum(self._sumsq / n - mean_c**2, 0.0)
        mean = mean_c + self._shift
        p2, p98 = zip(*(np.percentile(r, [2, 98]).tolist() for r in self._reservoirs))
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in np.sqrt(var)],
            "p2": list(p2),
            "p98": list(p98),
        }


def robust_band_stats(
    sample: np.ndarray | Iterable[np.ndarray], max_samples: int = 200_000, seed: int = 0
) -> dict[str, list[float]]:
    """Per-band ``{"mean", "std", "p2", "p98"}`` over valid (finite) values.

    ``sample`` is one ``(N, C)`` array or an iterable of ``(n, C)`` arrays (a stream of pixel
    samples, e.g. from chips or scene windows). Raises ``UserError`` when a band has no valid
    value at all.
    """
    if isinstance(sample, np.ndarray):
        if sample.ndim != 2:
            raise ValueError(f"expected an (N, C) array, got shape {sample.shape}")
        whole = BandStatsAccumulator(sample.shape[1], max_samples, seed)
        whole.update(sample)
        return whole.result()
    acc: BandStatsAccumulator | None = None
    for part in sample:
        part = np.asarray(part)
        if acc is None:
            acc = BandStatsAccumulator(part.shape[1], max_samples, seed)
        acc.update(part)
    if acc is None:
        raise UserError("no pixels to compute statistics from")
    return acc.result()


def pixel_sample(data: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random pixels (drawn with replacement over dates and positions) of a
    ``(T, C, H, W)`` or ``(C, H, W)`` array, as ``(m, C)``; pixels with every band NaN are left
    out, so ``m <= n``."""
    if data.ndim == 3:
        data = data[None]
    t, c, h, w = data.shape
    at = rng.integers(0, t * h * w, n)  # one draw per pixel: (frame, row, col) flattened
    frames, pixels = np.divmod(at, h * w)
    picked = (
        data.reshape(t, c, h * w)[frames, :, pixels]
        if data.flags.c_contiguous
        else data[frames, :, pixels // w, pixels % w]
    )
    return picked[np.isfinite(picked).any(axis=1)]
