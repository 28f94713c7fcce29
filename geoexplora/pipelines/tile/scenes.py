"""Inputs and scenes: the inputs' places (:mod:`geoexplora.io.inputs`) opened on one CRS."""

from __future__ import annotations

import logging

from geoexplora.errors import UserError, opt
from geoexplora.io.inputs import check_same_bands, collect_inputs, group_by_place
from geoexplora.pipelines.tile.config import TileConfig

log = logging.getLogger("geoexplora")


def scene_options_from(cfg: TileConfig, crs: str | None = None):
    from geoexplora.io.scene import SceneOptions

    return SceneOptions(
        bands=cfg.bands,
        sensor=cfg.sensor,
        band_map=cfg.band_map,
        resolution=cfg.resolution,
        nodata=cfg.nodata,
        dates=cfg.dates,
        s2_offset=cfg.s2_offset,
        crs=crs,
    )


def open_scenes(cfg: TileConfig, existing=None) -> tuple[list, list[str], list[str]]:
    """Open every place named by the inputs on the target CRS; check they agree on bands/dates.

    Returns the scenes, the files skipped as unreadable (``skip_bad``) and, appending to
    ``existing``, the files skipped as already in it (left out before grouping by place, so a
    new date of a known place is a scene of its own).
    """
    import rasterio

    from geoexplora.io.scene import open_scene

    paths = collect_inputs(cfg.inputs)
    already = []
    if existing is not None:
        known = existing.known_sources()
        already = [p for p in paths if p.resolve() in known]
        paths = [p for p in paths if p.resolve() not in known]
        if not paths:
            raise UserError(f"nothing to append: every file given is already in {existing.root}")
        if already:
            log.warning(
                "%d file(s) already in %s, skipped: %s",
                len(already),
                existing.root,
                ", ".join(p.name for p in already[:5]) + (", ..." if len(already) > 5 else ""),
            )
    places = group_by_place(paths, cfg.skip_bad)
    groups, skipped = places.groups, list(places.skipped)
    if not groups:
        raise UserError("no readable input scenes")
    if cfg.dates and len(groups) > 1:
        raise UserError(f"{opt('dates')} applies to one scene; the inputs are {len(groups)} places")
    target = cfg.crs
    if target is None:
        with rasterio.open(groups[0][0]) as src:
            target = src.crs.to_string()
    scenes = []
    for group in groups:
        try:
            scene = open_scene(group, scene_options_from(cfg, target))
            if (
                existing is not None
                and existing.meta["num_frames"] == 1
                and len(scene.dates) > 1
                and not cfg.dates
            ):
                scenes.extend(_one_scene_per_date(scene, scene_options_from(cfg, target)))
                continue
        except UserError as exc:
            if not cfg.skip_bad:
                raise
            log.warning("skipped (--skip-bad): %s", exc)
            skipped.extend(str(p) for p in group)
            continue
        scenes.append(scene)
    if not scenes:
        raise UserError("no readable input scenes (all skipped)")
    check_same_bands(scenes)
    first = scenes[0]
    for scene in scenes[1:]:
        if len(scene.dates) != len(first.dates):
            raise UserError(
                f"{scene.paths[0]}: {len(scene.dates)} date(s), "
                f"{first.paths[0]} has {len(first.dates)}; tile them separately"
            )
        if scene.res != first.res:
            log.warning(
                "%s: %.6g m pixels, %s has %.6g m; pass --resolution for one GSD",
                scene.paths[0].name,
                scene.res[0],
                first.paths[0].name,
                first.res[0],
            )
    if len(scenes) > 1:
        log.info("%d scenes (places) from %d files", len(scenes), sum(len(s.paths) for s in scenes))
    return scenes, skipped, [str(p) for p in already]


def _one_scene_per_date(scene, opts) -> list:
    """A several-date scene as one scene per date (appending to a dataset of one-date chips:
    new dates of a known place are more chips of it, not a time series)."""
    from geoexplora.io.scene import open_scene

    scene.close()
    return [open_scene(sorted({sb.path for sb in frame}), opts) for frame in scene.sources]
