"""From what a user named to scenes: the one input resolver of every verb that reads rasters
(tile, adapt, predict, embed, info).

The rule, documented in ``docs/concepts.md``:

1. **Files.** Each name is a file, a folder or a glob (``scenes/*.tif``, ``**`` recursive).
   A folder is searched recursively; in a folder that holds band files (``*_B04.tif``) only those
   are taken (the rest are previews, masks and the like). A file named twice (relative and
   absolute, or through a link) is one input. A URI (``https://``, ``s3://``, ``/vsicurl/``...)
   names one remote file (:mod:`geoexplora.io.remote`; no folders or globs there). A STAC Item or
   ItemCollection (``.json``, local or remote) or a parsed item names its band assets
   (:mod:`geoexplora.io.stac`).
2. **Places.** Files whose footprints overlap by at least :data:`SAME_PLACE_IOU` (intersection
   over union, in lon/lat) are one place: one scene, whose files are its bands or its dates.
   Others are scenes of their own. Grouping is by footprint only, never by folder, so the same
   files make the same scenes however they are named or laid out. The band assets of one STAC
   item are one place, never joined with other files.

The order of the scenes is the order of their first file; a scene's files keep input order.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from geoexplora.errors import UserError, opt
from geoexplora.io.remote import RemotePath, as_path, is_uri, refuse_listing
from geoexplora.log import logger

if TYPE_CHECKING:
    from geoexplora.io.scene import Scene

SAME_PLACE_IOU = 0.8  # footprints overlapping this much are one place (bands/dates of one scene)


@dataclass(frozen=True)
class Places:
    """The inputs as places: ``groups`` of files (one scene each), and the files left out as
    unreadable (only when asked to skip them)."""

    groups: tuple[tuple[Path | RemotePath, ...], ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.groups)


def collect_inputs(items: Sequence) -> list[Path | RemotePath]:
    """Files as given; globs expanded; folders searched recursively for raster files; URIs as
    given; STAC documents as their band assets (step 1 of the rule in the module docs)."""
    from geoexplora.io import stac
    from geoexplora.io.scene import RASTER_SUFFIXES, expand_inputs

    out: list[Path | RemotePath] = []
    for raw in items:
        if stac.is_stac_input(raw):
            for item, base in stac.load_items(raw):
                out.extend(stac.band_assets(item, base))
            continue
        if isinstance(raw, RemotePath) or is_uri(raw):
            text = str(raw)
            if text.split("?", 1)[0].endswith("/") or glob.has_magic(text.split("?", 1)[0]):
                refuse_listing(text)
            out.append(as_path(raw))
            continue
        text = str(raw)
        path = Path(text)
        if not path.exists() and glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UserError(f"{text}: the pattern matches no file")
            out.extend(collect_inputs(matches))
        elif path.is_dir():
            found = []
            for folder in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
                if any(
                    f.is_file() and f.suffix.lower() in RASTER_SUFFIXES for f in folder.iterdir()
                ):
                    found.extend(expand_inputs([folder]))
            if not found:
                raise UserError(f"{path}: folder holds no raster files")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not out:
        raise UserError("no input scenes given")
    unique: dict = {}
    for p in out:  # one file named twice (relative and absolute, a link) is one input
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def footprint(path: Path | RemotePath):
    """The file's footprint as a lon/lat box (shapely), or a UserError naming the file."""
    from rasterio.warp import transform_bounds
    from shapely import box

    from geoexplora.io.scene import open_georeferenced

    with open_georeferenced(path) as src:
        return box(*transform_bounds(src.crs, "EPSG:4326", *src.bounds))


def group_by_place(paths: Sequence[Path | RemotePath], skip_bad: bool = False) -> Places:
    """Files -> groups of one place each (footprint IoU >= :data:`SAME_PLACE_IOU`, joined
    transitively), in input order; the band assets of one STAC item are one place of their own.
    ``skip_bad``: an unreadable file is logged and left out rather than an error."""
    footprints, kept, skipped = [], [], []
    for p in paths:
        try:
            footprints.append(footprint(p))
            kept.append(p)
        except UserError as exc:
            if not skip_bad:
                raise
            logger.warning("skipped as unreadable: %s", exc)
            skipped.append(str(p))
    parent = list(range(len(kept)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    items = [getattr(getattr(p, "stac", None), "item", None) for p in kept]
    for i in range(len(kept)):
        for j in range(i):
            if items[i] is not None or items[j] is not None:  # a STAC item is its own place
                if items[i] == items[j]:
                    parent[root(i)] = root(j)
                continue
            a, b = footprints[i], footprints[j]
            union = a.union(b).area
            if union > 0 and a.intersection(b).area / union >= SAME_PLACE_IOU:
                parent[root(i)] = root(j)
    groups: dict[int, list[Path | RemotePath]] = {}
    for i, p in enumerate(kept):
        groups.setdefault(root(i), []).append(p)
    return Places(tuple(tuple(g) for g in groups.values()), tuple(skipped))


def resolve_places(items: Sequence[str | os.PathLike], skip_bad: bool = False) -> Places:
    """What the user named -> places (both steps of the rule)."""
    return group_by_place(collect_inputs(items), skip_bad)


def place_name(files: Sequence[Path]) -> str:
    """A place's name for an output file: a lone file's stem; else the name of the folder(s)
    holding its files when they share one (``2023-03/site/``, ``2023-04/site/``: ``site``); else
    the first file's stem; a STAC item's id."""
    asset = getattr(files[0], "stac", None)
    if asset is not None:
        return asset.item.rpartition("/")[2]
    if len(files) == 1:
        return files[0].stem
    names = {f.resolve().parent.name for f in files}
    return names.pop() if len(names) == 1 else files[0].stem


def check_same_bands(scenes: Sequence[Scene]) -> None:
    """Every scene has the first one's bands, in its order (a model, a dataset and a run have
    one band list): else a UserError naming both scenes' files and bands."""
    first = scenes[0]
    keys = [b.key for b in first.bands]
    for scene in scenes[1:]:
        if [b.key for b in scene.bands] != keys:
            raise UserError(
                f"{scene.paths[0]}: bands {_band_names(scene)} differ from "
                f"{first.paths[0]}'s {_band_names(first)}; pass {opt('bands')}"
            )


def _band_names(scene: Scene) -> str:
    return ",".join(b.name for b in scene.bands)
