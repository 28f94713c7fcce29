"""``geoexplora probe MODEL... CHIPS``: how good are a model's frozen features?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O


def probe(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="One or more models - model files, or sources by name (a timm/registry name, "
            "torchgeo:ENUM, hf-hub:ORG/NAME; built on the chips' bands) - then the chips dataset folder "
            "(written by tile).",
            metavar="MODEL... CHIPS",
        ),
    ],
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
            help="For a MODEL given by name: the chips' bands it is built on, in this "
            "order (default: all of them), e.g. B2,B3,B4,B8.",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="Feature sets the heads may read, comma-separated, from cls (last "
            "block's cls token), cls4 (last 4 blocks' cls tokens), cls+mean, "
            "cls4+mean (with the mean patch token). Default: all four.",
        ),
    ] = None,
    json_out: O.Json = False,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Folder for a confusion-matrix PNG per model.")
    ] = None,
    save_head: Annotated[
        Path | None,
        typer.Option(
            "--save-head",
            help="Write a task model file (backbone + best linear head on cls or "
            "cls+mean + classes), usable by predict. One MODEL only.",
        ),
    ] = None,
    learning_rates: Annotated[
        str | None,
        typer.Option(
            "--learning-rates",
            help="Base learning rates of the head grid (per batch 256), "
            "comma-separated. Default: 1e-4 ... 0.1.",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="SGD steps of the head grid.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Batch size of the head grid.")
    ] = None,
    knn_k: Annotated[int | None, typer.Option("--knn-k", help="Neighbours of the k-NN.")] = None,
    extract_batch_size: Annotated[
        int | None,
        typer.Option(
            "--extract-batch-size",
            help="Chips per forward pass of the frozen backbone while "
            "extracting features (memory bound).",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Feature cache folder (default: $GEOEXPLORA_CACHE_DIR or "
            "~/.cache/geoexplora/features).",
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Extract features again and do not store them.")
    ] = False,
    device: O.Device = None,
    num_workers: O.NumWorkers = 0,
    seed: O.Seed = 0,
    overwrite: O.Overwrite = False,
) -> None:
    """Linear probe (a grid of learning rates and feature sets, best head chosen on the val split,
    reported on the test split) and weighted k-NN on a model's frozen features. Several models
    print side by side. Features are extracted once per model and dataset and cached.

    Example: geoexplora probe vit_small_patch14_dinov2.lvd142m adapted.pt chips/ --json
    """
    from geoexplora.bands import parse_band_list
    from geoexplora.defaults import PROBE
    from geoexplora.errors import UserError
    from geoexplora.pipelines.probe import ProbeConfig
    from geoexplora.pipelines.probe import probe as run_probe
    from geoexplora.validate import given_or

    items = O.expand_paths(paths)
    if len(items) < 2:
        raise UserError("probe takes MODEL... CHIPS: one or more models, then the chips folder")
    cfg = ProbeConfig(
        models=items[:-1],
        chips=items[-1],
        init_weights=init_weights,
        bands=parse_band_list(bands),
        features=_names(features, "--features") or PROBE.features,
        learning_rates=_floats(learning_rates) or PROBE.learning_rates,
        steps=given_or(steps, PROBE.steps),
        batch_size=given_or(batch_size, PROBE.batch_size),
        knn_k=given_or(knn_k, PROBE.knn_k),
        extract_batch_size=given_or(extract_batch_size, PROBE.extract_batch_size),
        cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        plots_dir=plots,
        save_head=save_head,
        overwrite=overwrite,
        device=device,
        num_workers=num_workers,
        seed=seed,
    )
    doc = run_probe(cfg).to_dict()
    if json_out:
        O.print_json(doc)
    else:
        render_probe(doc)


def default_cache_dir() -> Path:
    """``$GEOEXPLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/geoexplora/features`` (~/.cache): the
    CLI's feature cache (the library caches only where it is told to)."""
    import os

    if os.environ.get("GEOEXPLORA_CACHE_DIR"):
        return Path(os.environ["GEOEXPLORA_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "geoexplora" / "features"


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    from geoexplora.errors import UserError

    if text is None:
        return None
    items = tuple(t.strip() for t in text.split(","))
    if any(not t for t in items):
        raise UserError(f"{option} '{text}' has an empty entry")
    return items


def _floats(text: str | None) -> tuple[float, ...] | None:
    from geoexplora.errors import UserError

    names = _names(text, "--learning-rates")
    if names is None:
        return None
    try:
        return tuple(float(t) for t in names)
    except ValueError as exc:
        raise UserError(f"--learning-rates '{text}': not numbers") from exc


def render_probe(doc: dict, console=None) -> None:
    """The models side by side (metrics, chosen head, per-class F1), then each model's confusion
    matrix; on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    models = doc["models"]
    multilabel = doc["task"] == "multilabel"
    table = Table(
        title=f"linear probe and k-NN on {doc['chips']} ({doc['evaluated_on']} split)",
        title_justify="left",
    )
    table.add_column("metric")
    for m in models:
        table.add_column(m["name"], justify="right")
    rows = [
        ("top-1", "top1"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro-F1", "macro_f1"),
        ("k-NN top-1", "knn_top1"),
    ]
    if multilabel:
        rows += [("mAP", "map"), ("micro-F1", "micro_f1"), ("k-NN mAP", "knn_map")]
    for label, key in rows:
        table.add_row(label, *(f"{m[key]:.3f}" for m in models))
    table.add_row(
        "head",
        *(f"{m['chosen_head']['features']} lr {m['chosen_head']['lr']:.2g}" for m in models),
        end_section=True,
    )
    for name in doc["classes"]:
        table.add_row(f"F1 {name}", *(f"{m['per_class_f1'][name]:.3f}" for m in models))
    console.print(table)
    for m in models if not multilabel else []:
        cm = Table(
            title=f"{m['name']}: confusion matrix (rows true, columns predicted)",
            title_justify="left",
        )
        cm.add_column("")
        for name in doc["classes"]:
            cm.add_column(name, justify="right")
        for name, row in zip(doc["classes"], m["confusion_matrix"]):
            cm.add_row(name, *(str(v) for v in row))
        console.print(cm)
    for note in doc["notes"]:
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
