"""``geoexplora predict MODEL RASTER... -o OUT``: georeferenced class maps from a task model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import PREDICT

Window = Annotated[
    int | None,
    typer.Option("--window", help="Window size in pixels (default: the model's image size)."),
]
Overlap = Annotated[
    int | None,
    typer.Option(
        "--overlap",
        help="Overlap of neighbouring windows in pixels (default: window/4; --dense "
        "classification window/2; classification grid 0).",
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
Blend = Annotated[
    str,
    typer.Option(
        "--blend",
        help="Overlap weights: cosine (flat centre, cosine ramps over the overlap), hann, "
        "none (plain mean).",
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the plan (windows, batches, band mapping, memory) and stop."
    ),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run (or assemble finished shards)."),
]
Shard = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="I/N: compute the I-th of N parts (strips of one raster, or every N-th "
        "input with -o DIR/); the last part to finish writes the output.",
    ),
]
Devices = Annotated[
    str | None,
    typer.Option("--devices", help="Several GPUs: a count (2) or a list (0,1 or cuda:0,cuda:1)."),
]
Output = Annotated[
    str,
    typer.Option(
        "-o", "--output", help="Output GeoTIFF (COG), or a folder (DIR/) for one output per input."
    ),
]


def predict(
    model: Annotated[Path, typer.Argument(help="Task model file (from finetune).")],
    output: Output,
    rasters: Annotated[
        list[str] | None,
        typer.Argument(
            help="Input rasters (files, URIs, STAC items): one scene (bands or dates in several "
            "files), or several scenes with -o DIR/. '-' reads paths from stdin.",
            show_default=False,
        ),
    ] = None,
    window: Window = None,
    overlap: Overlap = None,
    batch_size: BatchSize = PREDICT.batch_size,
    blend: Blend = PREDICT.blend,
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities", help="Also write class probabilities (OUT_probabilities.tif)."
        ),
    ] = False,
    prob_dtype: Annotated[
        str, typer.Option("--prob-dtype", help="float32, or uint8 (scaled by 1/254, 255 = nodata).")
    ] = "float32",
    uncertainty: Annotated[
        bool,
        typer.Option(
            "--uncertainty",
            help="Also write entropy and overlap disagreement (OUT_uncertainty.tif).",
        ),
    ] = False,
    vectorize: Annotated[
        Path | None,
        typer.Option(
            "--vectorize",
            help="Also write the class map as polygons (class, name, area) to a GeoPackage.",
        ),
    ] = None,
    dense: Annotated[
        bool,
        typer.Option(
            "--dense",
            help="Classification models: per-pixel map by sliding windows instead of "
            "one cell per window stride.",
        ),
    ] = False,
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
    stac_search: O.StacSearch = None,
    collection: O.Collection = None,
    bbox: O.Bbox = None,
    datetime: O.Datetime = None,
    max_items: O.MaxItems = 10,
    json_out: O.Json = False,
    overwrite: O.Overwrite = False,
) -> None:
    """Predict a georeferenced class map (Cloud-Optimised GeoTIFF with the input's CRS,
    transform and nodata, colour table, class names and overviews) with sliding, blended windows
    in bounded memory, plus a JSON sidecar (OUT.tif.json) recording model, band mapping, windows and
    timings. Input nodata is nodata in every output; an input with no valid pixel gives an
    all-nodata output and a warning. Classification models write one cell per window stride
    (the last row and column of cells may reach past the raster's edge, by less than one
    stride), or a per-pixel map with --dense.

    Example: geoexplora predict model.pt region.tif -o region_pred.tif --probabilities
    """
    from geoexplora.pipelines.predict import PredictConfig
    from geoexplora.pipelines.predict import predict as run

    cfg = PredictConfig(
        model=model,
        inputs=O.inputs_with_search(rasters, stac_search, collection, bbox, datetime, max_items),
        output=output,
        window=window,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        probabilities=probabilities,
        prob_dtype=prob_dtype,
        uncertainty=uncertainty,
        vectorize=vectorize,
        dense=dense,
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


def report(results: list[dict], json_out: bool, dry_run: bool) -> None:
    """Results on stdout: one JSON document, or one line per output."""
    if json_out:
        O.print_json({"dry_run": dry_run, "results": results})
        return
    for r in results:
        if dry_run:
            plan, mem = r["plan"], r["memory"]
            typer.echo(
                f"{r['output']}: {plan['windows']} windows ({plan['window_cols']} x "
                f"{plan['window_rows']}, window {plan['window']}, overlap "
                f"{plan['overlap']}), {r['batches']} batches of {r['batch_size']}, "
                f"output {plan['output_size'][0]} x {plan['output_size'][1]}, "
                f"~{mem['total_bytes'] / 2**20:.0f} MiB"
            )
            for m in r["band_mapping"]:
                typer.echo(
                    f"  {m['model_band']} <- {m['file']} band {m['file_band']}"
                    + (f" ({m['date']})" if m["date"] else "")
                )
        elif r["status"] == "complete":
            typer.echo(
                f"{r['output']}: {r['valid_pixels']} valid pixels; "
                + ", ".join(f"{k} {v}" for k, v in r["outputs"].items())
            )
        else:
            s = r["strips"]
            typer.echo(
                f"{r['output']}: part done ({s['this_run']} of {s['total']} strips "
                "computed here); waiting for the other shards"
            )


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
