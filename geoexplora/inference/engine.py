"""The streaming engine: windows read ahead in a thread, batched through a model on one or more
devices, blended into a rolling strip buffer, and yielded as finished output rows.

Memory is bounded by the window, the batch, the prefetch depth and the output *width*: the
accumulator holds ``channels x window x out_width`` floats, whatever the raster's height.

The model is a plain callable ``forward(x) -> y`` on torch tensors: ``x`` is ``(B, T, C, H, W)``
float32 canonical units with NaN for nodata (the model handles NaN), ``y`` is ``(B, K, h, w)``
(``h = H / factor``) or ``(B, K)`` (one value per window, spread over its output pixels).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from geoexplora.defaults import PREDICT
from geoexplora.inference.windows import Tile, WindowPlan, blend_weights

Forward = Callable  # (torch.Tensor (B,T,C,H,W)) -> torch.Tensor (B,K,h,w) | (B,K)


@dataclass
class Strip:
    """Finished output rows ``[row, row + n)``, full output width.

    ``values``: ``(K, n, W)`` blended predictions (undefined where ``weight`` is 0);
    ``weight``: ``(n, W)`` total blending weight (0 = nodata); ``votes``: ``(K, n, W)`` blending
    weight of the windows whose arg-max was each class (for overlap disagreement), or None.
    """

    row: int
    values: np.ndarray
    weight: np.ndarray
    votes: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return self.weight > 0


@dataclass
class Timings:
    """Seconds spent per stage (stages overlap; ``forward`` is device time as seen by callers)."""

    read: float = 0.0
    forward: float = 0.0
    blend: float = 0.0
    wall: float = 0.0
    windows: int = 0
    skipped: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return {
            "read_s": round(self.read, 3),
            "forward_s": round(self.forward, 3),
            "blend_s": round(self.blend, 3),
            "wall_s": round(self.wall, 3),
            "windows": self.windows,
            "skipped_windows": self.skipped,
            "batches": self.batches,
        }


class _Reader(threading.Thread):
    """Reads windows in plan order, drops those without valid output pixels, and queues batches
    ``(tiles, data (B,T,C,H,W), valid (B,n,n))``. One thread: rasterio handles are not
    thread-safe, and GDAL releases the GIL while reading.

    A batch never spans two window rows: runs over a row range (shards, resumed runs) then form
    exactly the batches of the full run, so their results are bit-identical to it (a model's
    floating-point result can depend on what else is in its batch)."""

    def __init__(
        self, scene, plan: WindowPlan, tiles, batch_size: int, depth: int, timings: Timings
    ):
        super().__init__(daemon=True, name="geoexplora-reader")
        self.scene, self.plan, self.tiles, self.batch_size = scene, plan, tiles, batch_size
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.timings = timings

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self):
        from rasterio.windows import Window

        try:
            batch, datas, valids = [], [], []
            for tile in self.tiles:
                if self.stop.is_set():
                    return
                t0 = time.perf_counter()
                data = self.scene.read(
                    Window(tile.col, tile.row, self.plan.window, self.plan.window)
                )
                valid = self.plan.output_valid(np.isfinite(data).all(axis=1).any(axis=0))
                self.timings.read += time.perf_counter() - t0
                if not valid.any():
                    self.timings.skipped += 1
                    continue
                if batch and tile.row != batch[0].row:  # see the class docstring
                    if not self._put((batch, np.stack(datas), np.stack(valids))):
                        return
                    batch, datas, valids = [], [], []
                batch.append(tile)
                datas.append(data)
                valids.append(valid)
                if len(batch) == self.batch_size:
                    if not self._put((batch, np.stack(datas), np.stack(valids))):
                        return
                    batch, datas, valids = [], [], []
            if batch and not self._put((batch, np.stack(datas), np.stack(valids))):
                return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            self._put(exc)


class _Runner:
    """One model replica on one device; runs a batch and returns numpy ``(B, K, n, n)``."""

    def __init__(self, forward: Forward, device, out_size: int):
        self.forward, self.device, self.out_size = forward, device, out_size

    def __call__(self, data: np.ndarray) -> tuple[np.ndarray, float]:
        import torch

        t0 = time.perf_counter()
        x = torch.from_numpy(data)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            y = self.forward(x)
            if y.ndim == 2:
                y = y[:, :, None, None].expand(-1, -1, self.out_size, self.out_size)
            elif y.shape[-2:] != (self.out_size, self.out_size):
                raise RuntimeError(
                    f"the model returned {tuple(y.shape)} for a window of "
                    f"{tuple(x.shape)}; expected (B, K, {self.out_size}, "
                    f"{self.out_size}) or (B, K)"
                )
            out = y.float().cpu().numpy()
        return out, time.perf_counter() - t0


class _Accumulator:
    """Rolling buffer over output rows ``[top, top + size)``; finished rows are emitted."""

    def __init__(self, channels: int, size: int, width: int, top: int, end: int, votes: bool):
        self.size, self.width, self.top, self.end = size, width, top, end
        self.values = np.zeros((channels, size, width), dtype=np.float32)
        self.weight = np.zeros((size, width), dtype=np.float32)
        self.votes = np.zeros((channels, size, width), dtype=np.float32) if votes else None

    def add(self, tile: Tile, pred: np.ndarray, weight: np.ndarray):
        n = weight.shape[0]
        r0, r1 = max(tile.out_row, self.top), min(tile.out_row + n, self.end)
        c0, c1 = tile.out_col, min(tile.out_col + n, self.width)
        if r1 <= r0 or c1 <= c0:
            return
        tr, tc = slice(r0 - tile.out_row, r1 - tile.out_row), slice(0, c1 - c0)
        br, bc = slice(r0 - self.top, r1 - self.top), slice(c0, c1)
        w = weight[tr, tc]
        self.values[:, br, bc] += pred[:, tr, tc] * w
        self.weight[br, bc] += w
        if self.votes is not None:
            winner = pred[:, tr, tc].argmax(axis=0)
            for k in range(self.votes.shape[0]):
                self.votes[k, br, bc] += np.where(winner == k, w, 0)

    def flush(self, until: int) -> Iterator[Strip]:
        """Emit rows ``[top, until)`` (clipped to the range end) and roll the buffer on."""
        until = min(until, self.end)
        while self.top < until:
            n = min(until - self.top, self.size)
            yield Strip(
                self.top,
                self.values[:, :n].copy(),
                self.weight[:n].copy(),
                None if self.votes is None else self.votes[:, :n].copy(),
            )
            for buf in (self.values, self.votes):
                if buf is not None:
                    buf[:, :-n] = buf[:, n:] if n < self.size else 0
                    buf[:, self.size - n :] = 0
            self.weight[:-n] = self.weight[n:] if n < self.size else 0
            self.weight[self.size - n :] = 0
            self.top += n


def run(
    scene,
    plan: WindowPlan,
    forwards: list[tuple[Forward, object]],
    channels: int,
    *,
    blend: str = PREDICT.blend,
    batch_size: int = PREDICT.batch_size,
    out_rows: tuple[int, int] | None = None,
    votes: bool = False,
    prefetch: int = PREDICT.prefetch,
    timings: Timings | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Strip]:
    """Blend the plan's windows over output rows ``[a, b)`` and yield finished strips in order.

    ``forwards``: one ``(forward, torch.device)`` per device; batches go round-robin and results
    are consumed in plan order. ``channels``: K, the model's output channels. Rows of the range
    that no valid window reaches come back with weight 0.
    """
    a, b = out_rows or (0, plan.out_height)
    timings = timings or Timings()
    weights = blend_weights(plan, blend)
    acc = _Accumulator(channels, plan.tile_out_size, plan.out_width, a, b, votes)
    reader = _Reader(scene, plan, plan.tiles((a, b)), batch_size, prefetch, timings)
    runners = [_Runner(f, d, plan.tile_out_size) for f, d in forwards]
    pool = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix="geoexplora-model")
    pending: deque = deque()
    start = time.perf_counter()
    reader.start()
    try:
        done_reading = False
        while not done_reading or pending:
            while not done_reading and len(pending) < 2 * len(runners):
                item = reader.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    done_reading = True
                    break
                tiles, data, valid = item
                runner = runners[timings.batches % len(runners)]
                pending.append((tiles, valid, pool.submit(runner, data)))
                timings.batches += 1
            if not pending:
                break
            tiles, valid, future = pending.popleft()
            pred, seconds = future.result()
            timings.forward += seconds
            if pred.shape[1] != channels:
                raise RuntimeError(
                    f"the model returned {pred.shape[1]} channels, expected {channels}"
                )
            t0 = time.perf_counter()
            for k, tile in enumerate(tiles):
                yield from acc.flush(tile.out_row)
                acc.add(tile, pred[k], weights * valid[k])
            timings.blend += time.perf_counter() - t0
            timings.windows += len(tiles)
            if on_batch:
                on_batch(len(tiles))
        yield from acc.flush(b)
    finally:
        reader.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        reader.join()
        timings.wall += time.perf_counter() - start
