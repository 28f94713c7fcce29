"""Windows and splits: candidate chips on each scene's grid, split by spatial blocks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from geoexplora.io import chips as C

log = logging.getLogger("geoexplora")


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

    planned = sum(
        len(window_offsets(s.height, size, stride, edge))
        * len(window_offsets(s.width, size, stride, edge))
        for s in scenes
    )
    check_fits(
        planned * CANDIDATE_BYTES,
        f"listing {planned:,} candidate chips of {size} px (stride {stride})",
        "use a larger --resolution (coarser pixels), --size or --stride, or an --aoi",
    )
    sc, rows, cols, boxes = [], [], [], []
    for i, scene in enumerate(scenes):
        r_offs = window_offsets(scene.height, size, stride, edge)
        c_offs = window_offsets(scene.width, size, stride, edge)
        if not r_offs or not c_offs:
            log.warning(
                "%s: %d x %d px is smaller than one %d px chip; skipped (--edge pad keeps "
                "it, padded with nodata)",
                scene.paths[0].name,
                scene.width,
                scene.height,
                size,
            )
            continue
        for r in r_offs:
            for c in c_offs:
                sc.append(i)
                rows.append(r)
                cols.append(c)
                boxes.append(box(*C.window_bounds(scene.transform, c, r, size, size)))
    n = len(sc)
    return Candidates(
        np.array(sc, dtype=np.int64),
        np.array(rows, dtype=np.int64),
        np.array(cols, dtype=np.int64),
        np.array(boxes, dtype=object),
        np.full(n, "train", dtype=object),
        np.full(n, "", dtype=object),
    )


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
    for i, key in enumerate(
        zip(np.floor(xs / block_m).astype(np.int64), np.floor(ys / block_m).astype(np.int64))
    ):
        keys.setdefault(key, []).append(i)
    return keys


def assign_splits(
    cands: Candidates,
    size: int,
    res: float,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    block_px: int | None = None,
    fixed_blocks=None,
) -> int | None:
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
    sub = Candidates(
        *(getattr(cands, f)[live] for f in ("scene", "row", "col", "boxes", "split", "drop"))
    )
    block_px = block_px or _auto_block(sub, size, res)
    blocks = _block_keys(sub, block_px * res)
    keys = sorted(blocks)
    order = np.random.default_rng(seed).permutation(len(keys))
    want = {"test": round(test_fraction * live.size), "val": round(val_fraction * live.size)}
    have = {"test": 0, "val": 0}
    fixed = fixed_blocks(block_px * res) if fixed_blocks else {}
    if len(keys) < 2 and not fixed:
        log.warning(
            "one spatial block only (%d px); all chips go to train (pass a smaller --split-block)",
            block_px,
        )
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
