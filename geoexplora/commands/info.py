"""``geoexplora info PATH...``: what a raster (or a model file, or a chips dataset) holds."""

from __future__ import annotations

from typing import Annotated

import typer

from geoexplora.commands import _options as O


def info(
    paths: Annotated[list[str], typer.Argument(
        help="Rasters, geoexplora model files or chips datasets (folders).")],
    sensor: O.Sensor = None,
    band_map: O.BandMap = None,
    s2_offset: O.S2Offset = "auto",
    nodata: O.Nodata = None,
    json_out: O.Json = False,
) -> None:
    """Describe rasters (size, CRS, resolution, dtype, nodata, identified bands, dates), model
    files (the model card) or chips datasets (chips, splits, bands, statistics, classes). A
    folder stands for the rasters in it (one file per band), unless it is a chips dataset.

    Example: geoexplora info scene.tif --json | jq .files[0].bands
    """
    from geoexplora.pipelines.info import describe_path, raster_files, render_description

    opts = O.scene_opts(sensor=sensor, band_map=band_map, s2_offset=s2_offset, nodata=nodata)
    docs = [describe_path(p, opts) for p in raster_files(O.expand_paths(paths))]
    if json_out:
        O.print_json({"files": docs})
    else:
        for doc in docs:
            render_description(doc)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
