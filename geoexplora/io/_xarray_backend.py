"""Lazy xarray view of a Scene: slicing the DataArray reads only the requested window."""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window
from xarray.backends import BackendArray
from xarray.core import indexing


class SceneBackendArray(BackendArray):
    def __init__(self, scene):
        self.scene = scene
        self.shape = scene.shape
        self.dtype = np.dtype("float32")

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple):
        key = tuple(key) + (slice(None),) * (4 - len(key))
        t_key, b_key, y_key, x_key = key
        ys = _as_slice(y_key, self.shape[2])
        xs = _as_slice(x_key, self.shape[3])
        y0, y1, ystep = ys.indices(self.shape[2])
        x0, x1, xstep = xs.indices(self.shape[3])
        data = self.scene.read(Window(x0, y0, max(0, x1 - x0), max(0, y1 - y0)))
        data = data[:, :, ::ystep, ::xstep]
        out = (
            data[t_key][:, b_key]
            if not isinstance(t_key, (int, np.integer))
            else data[t_key][b_key]
        )
        if isinstance(y_key, (int, np.integer)):
            out = out[..., 0, :]
        if isinstance(x_key, (int, np.integer)):
            out = out[..., 0]
        return out


def _as_slice(k, n: int) -> slice:
    if isinstance(k, (int, np.integer)):
        k = int(k) % n
        return slice(k, k + 1)
    return k
