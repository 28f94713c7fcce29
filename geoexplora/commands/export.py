"""``geoexplora export MODEL -o OUT``: any model spec as a model file, or as ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import EXPORT


def export(
    model: Annotated[
        str,
        typer.Argument(
            help="A model spec: a geoexplora model file, a timm/registry name "
            "(vit_small_patch14_dinov2.lvd142m), torchgeo:ENUM or hf-hub:ORG/NAME.",
            metavar="MODEL",
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The file to write.")],
    bands: O.Bands = None,
    sensor: Annotated[
        str | None,
        typer.Option(
            "--sensor", help="The sensor --bands names (default sentinel2); alone: all its bands."
        ),
    ] = None,
    init_weights: O.InitWeights = None,
    stats_from: Annotated[
        list[Path] | None,
        typer.Option(
            "--stats-from",
            help="Band statistics from a chips dataset folder or scenes "
            "(repeatable); default: the source's own.",
            metavar="CHIPS_OR_SCENES",
        ),
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="geoexplora (a model file) or onnx (plus OUT.json, checked with "
            "onnxruntime against PyTorch).",
        ),
    ] = "geoexplora",
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="ONNX input height and width in px (default: the model's)."
        ),
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = EXPORT.onnx_opset,
    seed: O.Seed = 0,
    overwrite: O.Overwrite = False,
    json_out: O.Json = False,
) -> None:
    """Write a model as a self-describing geoexplora model file (bands, statistics, provenance),
    so a source model is a file like any other, or as ONNX (a backbone or task model, with a
    JSON sidecar; onnxruntime's output is checked against PyTorch's and the max abs diff
    reported).

    Example: geoexplora export vit_small_patch14_dinov2.lvd142m --bands B2,B3,B4,B8 -o source.pt
    """
    from geoexplora.bands import parse_band_list
    from geoexplora.pipelines.export import ExportConfig
    from geoexplora.pipelines.export import export as run_export

    cfg = ExportConfig(
        model=model,
        output=output,
        bands=parse_band_list(bands),
        sensor=sensor,
        init_weights=init_weights,
        stats_from=stats_from or None,
        format=format,
        image_size=image_size,
        opset=opset,
        seed=seed,
        overwrite=overwrite,
    )
    doc = run_export(cfg).to_dict()
    if json_out:
        O.print_json(doc)
        return
    line = f"{doc['output']}: {doc['kind']} ({doc['format']}), bands {','.join(doc['bands'])}"
    if doc.get("check"):
        check = doc["check"]
        line += (
            f"; onnxruntime vs PyTorch max abs diff {check['max_abs_diff']:.3g} "
            f"(tolerance {check['tolerance']:.3g}); sidecar {doc['sidecar']}"
        )
    typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
