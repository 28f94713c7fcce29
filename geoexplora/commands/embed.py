"""``geoexplora embed MODEL RASTER -o OUT``: patch embeddings as a georeferenced raster."""

from __future__ import annotations

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
    model: Annotated[
        str,
        typer.Argument(
            help="Model file (adapted backbone or task model), or a source by name (a "
            "timm/registry name, torchgeo:ENUM, hf-hub:ORG/NAME; built on the raster's bands with its "
            "statistics).",
            metavar="MODEL",
        ),
    ],
    output: Output,
    rasters: Annotated[
        list[str] | None,
        typer.Argument(
            help="Input rasters (files, URIs, STAC items): one scene, or several scenes with -o "
            "DIR/. '-' reads stdin.",
            show_default=False,
        ),
    ] = None,
    pca: Annotated[
        int | None,
        typer.Option(
            "--pca", help="Reduce to K principal components (fitted on a sample of windows)."
        ),
    ] = None,
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
    init_weights: Annotated[
        str | None,
        typer.Option(
            "--init-weights",
            help="For a MODEL given by name: a local checkpoint of its "
            "architecture (Meta DINOv2 .pth, timm .safetensors/.pth, MAE), "
            "or 'random'.",
        ),
    ] = None,
    bands: Annotated[
        str | None,
        typer.Option(
            "--bands",
            help="For a MODEL given by name: the raster's bands it is built on, in this "
            "order (default: all of them), e.g. B2,B3,B4,B8.",
        ),
    ] = None,
    stac_search: O.StacSearch = None,
    collection: O.Collection = None,
    bbox: O.Bbox = None,
    datetime: O.Datetime = None,
    max_items: O.MaxItems = 10,
    json_out: O.Json = False,
    overwrite: O.Overwrite = False,
) -> None:
    """Write the model's patch embeddings as a multi-band GeoTIFF at patch resolution (pixel =
    patch size x input pixel), windowed and blended like predict, for similarity search,
    clustering and unsupervised mapping in a GIS.

    Example: geoexplora embed adapted.pt region.tif -o region_emb.tif --pca 8
    """
    from geoexplora.bands import parse_band_list
    from geoexplora.pipelines.embed import EmbedConfig
    from geoexplora.pipelines.embed import embed as run

    cfg = EmbedConfig(
        model=model,
        inputs=O.inputs_with_search(rasters, stac_search, collection, bbox, datetime, max_items),
        output=output,
        init_weights=init_weights,
        bands=parse_band_list(bands),
        pca=pca,
        dtype=dtype,
        window=window,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        creation_options=O.parse_creation_options(co),
        dry_run=dry_run,
        resume=resume,
        shard=shard,
        overwrite=overwrite,
        device=device,
        devices=devices,
        scene=O.scene_opts(
            band_map=band_map, sensor=sensor, nodata=nodata, s2_offset=s2_offset, dates=dates
        ),
    )
    report([r.to_dict() for r in run(cfg)], json_out, dry_run)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
