"""``geoexplora embed MODEL RASTER -o OUT``: patch embeddings as a georeferenced raster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.commands.predict import (
    BatchSize,
    Blend,
    Devices,
    DryRun,
    Output,
    Overlap,
    Resume,
    Shard,
    Window,
    report,
)
from geoexplora.defaults import PREDICT


def embed(
    model: Annotated[Path, typer.Argument(help="Model file (adapted backbone or task model).")],
    rasters: Annotated[list[str], typer.Argument(
        help="Input rasters: one scene, or several scenes with -o DIR/. '-' reads stdin.")],
    output: Output,
    pca: Annotated[int | None, typer.Option(
        "--pca", help="Reduce to K principal components (fitted on a sample of windows).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16.")] = "float32",
    window: Window = None,
    overlap: Overlap = None,
    batch_size: BatchSize = PREDICT.batch_size,
    blend: Blend = PREDICT.blend,
    co: O.CreationOptions = None,
    dry_run: DryRun = False,
    resume: Resume = False,
    shard: Shard = None,
    device: O.Device = None,
    devices: Devices = None,
    band_map: O.BandMap = None,
    sensor: O.Sensor = None,
    nodata: O.Nodata = None,
    s2_offset: O.S2Offset = "auto",
    dates: O.Dates = None,
    json_out: O.Json = False,
    overwrite: O.Overwrite = False,
) -> None:
    """Write the model's patch embeddings as a multi-band GeoTIFF at patch resolution (pixel =
    patch size x input pixel), windowed and blended like predict, for similarity search,
    clustering and unsupervised mapping in a GIS.

    Example: geoexplora embed adapted.pt region.tif -o region_emb.tif --pca 8
    """
    from geoexplora.pipelines.embed import EmbedConfig
    from geoexplora.pipelines.embed import embed as run

    cfg = EmbedConfig(
        model=model, inputs=O.expand_paths(rasters), output=output, pca=pca, dtype=dtype,
        window=window, overlap=overlap, batch_size=batch_size, blend=blend,
        creation_options=O.parse_creation_options(co), dry_run=dry_run, resume=resume,
        shard=shard, overwrite=overwrite, device=device, devices=devices,
        scene=O.scene_opts(band_map=band_map, sensor=sensor, nodata=nodata,
                           s2_offset=s2_offset, dates=dates))
    report([r.to_dict() for r in run(cfg)], json_out, dry_run)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
