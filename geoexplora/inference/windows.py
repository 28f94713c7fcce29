"""Window plans for sliding-window inference, and the blending weights of one window.

A plan maps input windows (pixel offsets into the raster, possibly hanging past its edge: reads
are boundless) to where their prediction lands in the output raster. The output grid is the input
grid coarsened by an integer ``factor``:

* ``dense`` (segmentation, ``--dense`` classification, embeddings): a window of ``window`` input
  pixels yields ``window / factor`` output pixels (``factor`` = 1 for per-pixel maps, the patch
  size for patch embeddings). Window starts step by ``stride``; the last one is moved back so it
  ends at the raster's edge instead of hanging past it (a raster smaller than one window gets one
  padded window).
* ``grid`` (classification): one output cell per ``stride`` x ``stride`` block of input pixels;
  the cell's window is centred on it, so neighbouring windows overlap by ``window - stride``.

Output row ``r`` covers input rows ``[r * factor, (r + 1) * factor)``; an output pixel is valid
when any input pixel of its block is valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np

from geoexplora.errors import UserError, opt

Blend = Literal["cosine", "hann", "none"]
BLENDS: tuple[str, ...] = get_args(Blend)
MODES = ("dense", "grid")


@dataclass(frozen=True)
class Tile:
    """One window: where it is read (input pixels) and where its prediction goes (output)."""

    index: int
    row: int
    col: int
    out_row: int
    out_col: int


def axis_starts(size: int, window: int, stride: int, factor: int) -> list[int]:
    """Window starts along one axis of ``size`` input pixels (dense mode)."""
    end = math.ceil(size / factor) * factor
    if end <= window:
        return [0]
    starts = list(range(0, end - window, stride))
    starts.append(end - window)
    return starts


@dataclass(frozen=True)
class WindowPlan:
    height: int
    width: int
    window: int
    stride: int
    factor: int = 1
    mode: str = "dense"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.window < 1 or self.stride < 1 or self.stride > self.window:
            raise UserError(
                f"must be in [0, window): window {self.window}, stride {self.stride}",
                option="overlap",
            )
        if self.mode == "dense" and (self.window % self.factor or self.stride % self.factor):
            raise UserError(
                f"{opt('window')} ({self.window}) and {opt('overlap')} "
                f"({self.window - self.stride}) must be multiples of {self.factor} "
                "(the model's patch size)"
            )

    @classmethod
    def dense(cls, height, width, window, overlap, factor=1) -> WindowPlan:
        return cls(height, width, window, window - overlap, factor, "dense")

    @classmethod
    def grid(cls, height, width, window, overlap) -> WindowPlan:
        """Classification grid: one cell per stride; the output factor is the stride."""
        stride = window - overlap
        return cls(height, width, window, stride, stride, "grid")

    @property
    def overlap(self) -> int:
        return self.window - self.stride

    @property
    def tile_out_size(self) -> int:
        """Output pixels per window side."""
        return self.window // self.factor if self.mode == "dense" else 1

    @property
    def out_height(self) -> int:
        return math.ceil(self.height / self.factor)

    @property
    def out_width(self) -> int:
        return math.ceil(self.width / self.factor)

    @property
    def valid_offset(self) -> int:
        """Where, inside a window, the input block of its output pixels starts."""
        return 0 if self.mode == "dense" else (self.window - self.stride) // 2

    def _starts(self, size: int) -> list[tuple[int, int]]:
        """(input start, output start) pairs along one axis."""
        if self.mode == "dense":
            return [
                (s, s // self.factor)
                for s in axis_starts(size, self.window, self.stride, self.factor)
            ]
        return [
            (i * self.stride - self.valid_offset, i) for i in range(math.ceil(size / self.stride))
        ]

    @cached_property
    def rows(self) -> list[tuple[int, int]]:
        return self._starts(self.height)

    @cached_property
    def cols(self) -> list[tuple[int, int]]:
        return self._starts(self.width)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self, out_rows: tuple[int, int] | None = None):
        """Tiles in raster order whose output touches output rows ``[a, b)`` (default: all)."""
        a, b = out_rows or (0, self.out_height)
        size = self.tile_out_size
        for i, (row, out_row) in enumerate(self.rows):
            if out_row + size <= a or out_row >= b:
                continue
            for j, (col, out_col) in enumerate(self.cols):
                yield Tile(i * len(self.cols) + j, row, col, out_row, out_col)

    def count(self, out_rows: tuple[int, int] | None = None) -> int:
        a, b = out_rows or (0, self.out_height)
        size = self.tile_out_size
        n = sum(1 for _, r in self.rows if r + size > a and r < b)
        return n * len(self.cols)

    def output_valid(self, data_valid: np.ndarray) -> np.ndarray:
        """Input validity ``(..., window, window)`` -> output validity ``(..., n, n)``."""
        o, n, f = self.valid_offset, self.tile_out_size, self.factor
        block = data_valid[..., o : o + n * f, o : o + n * f]
        if f == 1:
            return block
        shape = (*block.shape[:-2], n, f, n, f)
        return block.reshape(shape).any(axis=(-3, -1))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "window": self.window,
            "overlap": self.overlap,
            "stride": self.stride,
            "factor": self.factor,
            "windows": len(self),
            "window_rows": len(self.rows),
            "window_cols": len(self.cols),
            "output_size": [self.out_width, self.out_height],
        }


def taper(n: int, blend: str, overlap: int) -> np.ndarray:
    """1-D weights of ``n`` output pixels; strictly positive so a pixel seen by one window only
    keeps its value.

    ``cosine``: flat centre with a raised-cosine ramp over the overlap at each side, so two
    neighbouring windows cross-fade with weights summing to one (a Tukey window).
    ``hann``: sin^2 over the whole window. ``none``: flat (plain mean of the overlaps).
    """
    x = np.arange(n, dtype=np.float64) + 0.5
    if blend == "none" or (blend == "cosine" and overlap == 0):
        w = np.ones(n)
    elif blend == "hann":
        w = np.sin(np.pi * x / n) ** 2
    elif blend == "cosine":
        ramp = min(overlap, n // 2)
        w = np.ones(n)
        edge = np.sin(0.5 * np.pi * x[:ramp] / ramp) ** 2
        w[:ramp] = edge
        w[n - ramp :] = edge[::-1]
    else:
        raise UserError(f"must be one of {', '.join(BLENDS)}, not '{blend}'", option="blend")
    return w.astype(np.float32)


def blend_weights(plan: WindowPlan, blend: str) -> np.ndarray:
    """``(n, n)`` weights of one window's output pixels (grid mode: one cell, weight 1)."""
    n = plan.tile_out_size
    if plan.mode == "grid":
        return np.ones((1, 1), dtype=np.float32)
    w = taper(n, blend, plan.overlap // plan.factor)
    return np.outer(w, w)
