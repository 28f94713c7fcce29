"""``geoexplora demo``: the whole pipeline on the bundled real sample (``make demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every output.")] = Path(
        "demo-out"),
    adapt_steps: Annotated[int, typer.Option("--adapt-steps", help="ExPLoRA steps.")] = 400,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps",
                                                help="LoRA fine-tuning steps.")] = 200,
    probe_steps: Annotated[int, typer.Option("--probe-steps",
                                             help="Steps of each linear-probe head.")] = 300,
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

    Example: geoexplora demo --out demo-out --overwrite
    """
    from geoexplora.pipelines.demo import DemoConfig, render_summary, run_demo

    doc = run_demo(DemoConfig(out=out, overwrite=overwrite, adapt_steps=adapt_steps,
                              finetune_steps=finetune_steps, probe_steps=probe_steps, init=init,
                              init_weights=init_weights, device=device, seed=seed))
    if json_out:
        O.print_json(doc)
    else:
        render_summary(doc)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
