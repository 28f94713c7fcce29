"""``geoexplora demo``: the whole pipeline on the bundled real sample (``make demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import DEMO


def demo(
    output: Annotated[
        Path, typer.Option("-o", "--output", "--out", help="Folder for every output.")
    ] = Path("demo-out"),
    adapt_steps: Annotated[
        int, typer.Option("--adapt-steps", help="ExPLoRA steps.")
    ] = DEMO.adapt_steps,
    finetune_steps: Annotated[
        int, typer.Option("--finetune-steps", help="LoRA fine-tuning steps.")
    ] = DEMO.finetune_steps,
    probe_steps: Annotated[
        int, typer.Option("--probe-steps", help="Steps of each linear-probe head.")
    ] = DEMO.probe_steps,
    init: O.Init = None,
    init_weights: O.InitWeights = None,
    device: O.Device = None,
    seed: O.Seed = 0,
    json_out: O.Json = False,
    overwrite: O.Overwrite = False,
) -> None:
    """Run tile -> adapt -> probe (source vs adapted) -> finetune -> predict on the real
    Sentinel-2 sample bundled with the package, writing the chips dataset, model files,
    prediction COG, a quicklook PNG and the loss curves into one folder.

    Without GEOEXPLORA_INIT_WEIGHTS the source model is a tiny ViT with random weights (no pre-trained weights can be downloaded offline); the summary says which was used.

    Example: geoexplora demo -o demo-out --overwrite
    """
    import os

    from geoexplora.pipelines.demo import DemoConfig
    from geoexplora.pipelines.demo import demo as run_demo

    # The environment is read here, never by the library: the variables stand in for the flags.
    init = init or os.environ.get("GEOEXPLORA_INIT")
    init_weights = init_weights or os.environ.get("GEOEXPLORA_INIT_WEIGHTS")
    doc = run_demo(
        DemoConfig(
            output=output,
            overwrite=overwrite,
            adapt_steps=adapt_steps,
            finetune_steps=finetune_steps,
            probe_steps=probe_steps,
            init=init,
            init_weights=init_weights,
            device=device,
            seed=seed,
        )
    )
    if json_out:
        O.print_json(doc)
    else:
        render_summary(doc)


def render_summary(doc: dict, console=None) -> None:
    """The short summary table of ``geoexplora demo`` (stdout)."""
    from rich.console import Console
    from rich.table import Table

    from geoexplora.pipelines.demo import CHIP_SIZE

    console = console or Console()
    console.print(f"[bold]geoexplora demo[/bold] -> {doc['output']}")
    console.print(doc["source"])
    table = Table("step", "result", "seconds")
    s = doc["seconds"]
    ch = doc["chips"]
    table.add_row(
        "tile",
        f"{ch['count']} chips of {CHIP_SIZE} px, splits {ch['splits']}, "
        f"classes {', '.join(ch['classes'])}",
        str(s["tile"]),
    )
    a = doc["adapt"]
    table.add_row(
        "adapt",
        f"{a['steps']} steps, loss {a['first_loss']:.3f} -> "
        f"{a['last_loss']:.3f}; trained {a['trainable']:,} of {a['total']:,} "
        "parameters",
        str(s["adapt"]),
    )
    for m in doc["probe"]["models"]:
        table.add_row(
            f"probe {m['name']}",
            f"top-1 {m['top1']:.3f}, balanced "
            f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, k-NN "
            f"{m['knn_top1']:.3f} (on {doc['probe']['evaluated_on']})",
            str(s["probe"]),
        )
    f = doc["finetune"]
    table.add_row(
        "finetune",
        f"lora, loss {f['first_loss']:.3f} -> {f['last_loss']:.3f}; val {_fmt_metrics(f['val'])}",
        str(s["finetune"]),
    )
    table.add_row("predict", f"{doc['predict']['path']}", str(s["predict"]))
    table.add_row("quicklook", doc["quicklook"], str(s["quicklook"]))
    console.print(table)


def _fmt_metrics(metrics: dict) -> str:
    keys = [k for k in ("miou", "pixel_accuracy", "top1", "macro_f1") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
