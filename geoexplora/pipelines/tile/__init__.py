"""``tile``: scenes (and labels) -> a chips dataset (see ``geoexplora.io.chips`` for the format).

How it works (one module per step):

1. Inputs (files, folders, globs) are grouped into scenes by :mod:`geoexplora.io.inputs`: files
   whose footprints coincide are one place (one file per band and/or per date, aligned on one
   grid by ``open_scene``); scenes in another CRS are reprojected to ``crs`` (or the first
   scene's) (:mod:`.scenes`).
2. Each scene gets a grid of candidate windows (``size``, ``stride``, ``edge``); windows outside
   the AOI, or (when labels are required) touching no label, are dropped without reading pixels
   (:mod:`.grid`, :mod:`.labels`).
3. Splits are assigned by spatial blocks of the target CRS, then any val/test chip overlapping a
   chip of another split is dropped, so overlapping chips never straddle train and val/test
   (:mod:`.grid`). Steps 1-3 make a :class:`~.plan.TilePlan`; ``dry_run`` reports it.
4. Pixels are read once, in blocks of several chips bounded in memory, and chips are cut from
   memory and written (in parallel with ``workers``); chips over ``max_nodata`` are dropped
   (:mod:`.workers`).
5. Statistics (``io.stats``) come from a pixel sample of the written chips. The index and
   ``dataset.json`` are written last, and the folder is renamed into place only when complete
   (:mod:`.writer`, :func:`~.plan.execute`).

Class folders (``DIR/<class>/*.tif``) take another road: :mod:`.class_folders`.
"""

from geoexplora.pipelines.tile.config import TileConfig, TileResult
from geoexplora.pipelines.tile.grid import window_offsets
from geoexplora.pipelines.tile.plan import TilePlan, execute, plan_tile, tile
from geoexplora.pipelines.tile.scenes import open_scenes

__all__ = [
    "TileConfig",
    "TilePlan",
    "TileResult",
    "execute",
    "open_scenes",
    "plan_tile",
    "tile",
    "window_offsets",
]
