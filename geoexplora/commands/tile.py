"""``geoexplora tile SCENE... -o DIR``: scenes (and labels) to a chips dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import TILE


def tile(
    output: Annotated[
        str, typer.Option("-o", "--output", "--out", help="The chips dataset folder to write.")
    ],
    scenes: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scene files, folders (searched recursively), globs, URIs, STAC items or item "
            "collections, or - (paths on stdin). With --class-folders: the root folder of "
            "DIR/<class>/*.tif.",
            metavar="SCENE",
            show_default=False,
        ),
    ] = None,
    bands: O.Bands = None,
    sensor: O.Sensor = None,
    band_map: O.BandMap = None,
    nodata: O.Nodata = None,
    s2_offset: O.S2Offset = "auto",
    resolution: O.Resolution = None,
    dates: O.Dates = None,
    crs: Annotated[
        str | None,
        typer.Option("--crs", help="Target CRS (e.g. EPSG:32633); default: the first scene's."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", help="Vector labels (GPKG, GeoJSON, Shapefile); needs --label-field."
        ),
    ] = None,
    label_field: Annotated[
        str | None,
        typer.Option("--label-field", help="The field of --labels holding the class names."),
    ] = None,
    label_layer: Annotated[
        str | None, typer.Option("--label-layer", help="The layer of --labels (multi-layer files).")
    ] = None,
    label_raster: Annotated[
        str | None,
        typer.Option(
            "--label-raster",
            help="A class raster (e.g. land cover); resampled with nearest "
            'neighbour. Class names from a CLASSES="1=forest,..." tag.',
        ),
    ] = None,
    class_folders: Annotated[
        bool,
        typer.Option(
            "--class-folders",
            help="Import DIR/<class>/*.tif patches (EuroSAT style) as a classification dataset.",
        ),
    ] = False,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="none, classification (majority class per chip), multilabel (classes "
            "present) or segmentation (masks). Default: segmentation for polygons "
            "and rasters, classification for points and class folders.",
        ),
    ] = None,
    min_label_fraction: Annotated[
        float | None,
        typer.Option(
            "--min-label-fraction",
            help="Share of a chip's pixels a class needs to be its label "
            "(classification: the majority; multilabel: each) "
            f"[default: {TILE.min_label_fraction}].",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help=f"Chip size in pixels [default: {TILE.size}; class folders: the patch size].",
            show_default=False,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            help="Step between chips in pixels (< size overlaps) [default: size].",
            show_default=False,
        ),
    ] = None,
    edge: Annotated[
        str,
        typer.Option(
            "--edge",
            help="Chips at the right/bottom edge: drop partial ones, or pad them with nodata.",
        ),
    ] = "drop",
    max_nodata: Annotated[
        float | None,
        typer.Option(
            "--max-nodata",
            help=f"Drop chips with a larger share of nodata pixels [default: {TILE.max_nodata}].",
            show_default=False,
        ),
    ] = None,
    aoi: Annotated[
        str | None,
        typer.Option("--aoi", help="Vector area of interest; chips outside it are dropped."),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            "--val-fraction",
            help="Share of chips for validation (spatially blocked) "
            f"[default: {TILE.val_fraction}].",
            show_default=False,
        ),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(
            "--test-fraction",
            help=f"Share of chips for testing (spatially blocked) [default: {TILE.test_fraction}].",
            show_default=False,
        ),
    ] = None,
    split_block: Annotated[
        int | None,
        typer.Option(
            "--split-block",
            help="Side of the spatial split blocks in pixels [default: 8, 4, 2 or 1 "
            "chips, the largest giving 20 blocks].",
            show_default=False,
        ),
    ] = None,
    seed: O.Seed = 0,
    workers: Annotated[int, typer.Option("--workers", help="Parallel processes.")] = 1,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Skip unreadable files (named in the log) instead of stopping.",
        ),
    ] = False,
    co: O.CreationOptions = None,
    stac_search: O.StacSearch = None,
    collection: O.Collection = None,
    bbox: O.Bbox = None,
    datetime: O.Datetime = None,
    max_items: O.MaxItems = 10,
    json_out: O.Json = False,
    overwrite: O.Overwrite = False,
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="Add the chips of new scenes (or patches) to the existing dataset at "
            "-o: its bands, chip size, CRS, classes, split blocks and the reading "
            "and split options of its first run carry over unless given; files "
            "already in it are skipped.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (scenes, chips to read, drops known before reading, "
            "splits, disk and memory) and stop; no chip is read or written.",
        ),
    ] = False,
) -> None:
    """Cut scenes into a training-ready chips dataset: chip GeoTIFFs, a GeoParquet index and
    dataset.json (bands, statistics, classes). Labels come from a vector layer, a class raster or
    class folders; splits are spatially blocked.

    Example: geoexplora tile ./scenes --size 224 --labels fields.gpkg --label-field crop -o chips/
    """
    from geoexplora.io.scene import scene_options
    from geoexplora.pipelines.tile import TileConfig
    from geoexplora.pipelines.tile import tile as run_tile

    opts = scene_options(
        bands=bands,
        sensor=sensor,
        band_map=band_map,
        resolution=resolution,
        nodata=nodata,
        dates=dates,
        s2_offset=s2_offset,
        crs=crs,
    )
    inputs = O.inputs_with_search(scenes, stac_search, collection, bbox, datetime, max_items)
    cfg = TileConfig(
        inputs=[p if isinstance(p, dict) else str(p) for p in inputs],
        output=output,
        size=size,
        stride=stride,
        bands=opts.bands,
        sensor=opts.sensor,
        band_map=opts.band_map,
        nodata=opts.nodata,
        s2_offset=opts.s2_offset,
        resolution=opts.resolution,
        dates=opts.dates,
        crs=opts.crs,
        labels=labels,
        label_field=label_field,
        label_layer=label_layer,
        label_raster=label_raster,
        class_folders=class_folders,
        task=task,
        min_label_fraction=min_label_fraction,
        aoi=aoi,
        max_nodata=max_nodata,
        edge=edge,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_block=split_block,
        seed=seed,
        workers=workers,
        overwrite=overwrite,
        append=append,
        skip_bad=skip_bad,
        dry_run=dry_run,
        creation_options=O.parse_creation_options(co),
    )
    result = run_tile(cfg)
    if json_out:
        O.print_json(result.to_dict())
        return
    splits = ", ".join(f"{k} {v}" for k, v in sorted(result.splits.items()))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items())) or "none"
    if result.plan is not None:
        plan = result.plan
        where = (
            f"{len(plan['scenes'])} scene(s) in {plan['blocks']} read blocks"
            if "scenes" in plan
            else f"{plan['patches']} patch files"
        )
        memory = (
            f", ~{_size(plan['memory_bytes'])} of pixels in memory"
            if "memory_bytes" in plan
            else ""
        )
        typer.echo(
            f"{result.output}: would write at most {result.chips} chips ({splits}) of "
            f"{result.chip_size} px from {where}; dropped before reading: {dropped}; "
            f"at most {_size(plan['disk_bytes_at_most'])} on disk{memory}"
        )
        for i, scene in enumerate(plan.get("scenes", []), start=1):
            dates = ", ".join(d or "undated" for d in scene["dates"])
            typer.echo(
                f"  scene {i}: {scene['width']} x {scene['height']} px ({dates}): "
                + ", ".join(Path(p).name for p in scene["paths"])
            )
        return
    if result.appended:
        typer.echo(
            f"{result.output}: {result.chips} chips added, {result.dataset_chips} in all "
            f"({splits}) of {result.chip_size} px, task {result.task}; dropped: {dropped}"
        )
    else:
        typer.echo(
            f"{result.output}: {result.chips} chips ({splits}) of {result.chip_size} px, "
            f"task {result.task}; dropped: {dropped}"
        )
    for cl in result.classes:
        typer.echo(f"  {cl['id']:>3} {cl['name']}: {cl['chips']} chips")


def _size(n: float) -> str:
    """Bytes as text: ``812 B``, ``3.4 MB``, ``1.2 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def register(app: typer.Typer) -> None:
    app.command("tile")(tile)
