"""``geoexplora finetune MODEL CHIPS -o OUT``: train a task head (and LoRA) on a chips dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import FINETUNE


def finetune(
    model: Annotated[
        str,
        typer.Argument(
            help="Model file (adapted backbone, or a task model), or a source by name (a "
            "timm/registry name, torchgeo:ENUM, hf-hub:ORG/NAME; built on the chips' bands).",
            metavar="MODEL",
        ),
    ],
    chips: Annotated[Path, typer.Argument(help="Labelled chips dataset folder (written by tile).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The task model file.")],
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
    task: Annotated[
        str | None,
        typer.Option(
            "--task", help="classification, multilabel or segmentation (default: the dataset's)."
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="lora (LoRA on q,v of all blocks + head: the paper's), linear (head "
            "only), full (everything), explora (last block + LoRA + norms + "
            "head).",
        ),
    ] = FINETUNE.mode,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimiser steps.")] = None,
    epochs: Annotated[
        float | None,
        typer.Option(
            "--epochs", help=f"Passes over the training chips (default {FINETUNE.epochs})."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Chips per device per micro-batch.")
    ] = FINETUNE.batch_size,
    accumulate: Annotated[
        int, typer.Option("--accumulate", help="Micro-batches per optimiser step.")
    ] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help=f"Peak learning rate (default {FINETUNE.base_lr:g} x global batch / "
            f"{FINETUNE.base_batch}).",
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            help=f"Warm-up steps (default {FINETUNE.warmup_epochs:g} epochs, at "
            f"most {FINETUNE.warmup_max_fraction:.0%} of the run).",
        ),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay.")
    ] = FINETUNE.weight_decay,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", help="Label smoothing.")
    ] = FINETUNE.label_smoothing,
    drop_path: Annotated[
        float, typer.Option("--drop-path", help="Stochastic depth at the last block.")
    ] = FINETUNE.drop_path,
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", help="LoRA rank (lora, explora modes).")
    ] = FINETUNE.lora_rank,
    lora_alpha: Annotated[
        float, typer.Option("--lora-alpha", help="LoRA alpha.")
    ] = FINETUNE.lora_alpha,
    class_weights: Annotated[
        str,
        typer.Option(
            "--class-weights",
            help="Loss weights against class imbalance: inverse_sqrt, inverse "
            "(of the training frequency) or none.",
        ),
    ] = FINETUNE.class_weighting,
    no_augment: Annotated[
        bool, typer.Option("--no-augment", help="No random flips and 90-degree rotations.")
    ] = False,
    eval_every: Annotated[
        int | None,
        typer.Option("--eval-every", help="Steps between validations (default: every epoch)."),
    ] = None,
    patience: Annotated[
        int,
        typer.Option("--patience", help="Stop after this many validations without improvement."),
    ] = FINETUNE.patience,
    accelerator: Annotated[str, typer.Option("--accelerator", help="auto, cpu or gpu.")] = "auto",
    devices: Annotated[int, typer.Option("--devices", help="Devices (GPUs) per node.")] = 1,
    num_nodes: Annotated[int, typer.Option("--num-nodes", help="Nodes (e.g. under SLURM).")] = 1,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy", help="Lightning Fabric strategy; auto = DDP with more than one device."
        ),
    ] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="bf16-mixed (default on GPUs that have it), 16-mixed, 32-true (default on CPU).",
        ),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers", help="Data-loading workers per device (default: min(4, CPUs-1))."
        ),
    ] = None,
    seed: O.Seed = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT-stem.ckpt exactly where it stopped.")
    ] = False,
    overwrite: O.Overwrite = False,
    json_out: O.Json = False,
) -> None:
    """Fine-tune a model for scene classification, multi-label classification or semantic
    segmentation on a labelled chips dataset, on the same engine as adapt. Validates every epoch,
    keeps the best weights, stops early; writes the task model (LoRA merged, head, classes,
    colours, metrics, provenance), OUT-stem.log.jsonl and OUT-stem.loss.png.

    Example: geoexplora finetune adapted.pt chips/ --task segmentation -o model.pt
    """
    from geoexplora.bands import parse_band_list
    from geoexplora.pipelines.finetune import FinetuneConfig
    from geoexplora.pipelines.finetune import finetune as run_finetune

    cfg = FinetuneConfig(
        model=model,
        chips=chips,
        output=output,
        init_weights=init_weights,
        bands=parse_band_list(bands),
        task=task,
        mode=mode,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        drop_path=drop_path,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        class_weighting=class_weights,
        augment=not no_augment,
        eval_every=eval_every,
        patience=patience,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        num_workers=num_workers,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
    )
    result = run_finetune(cfg)
    if result is None:  # another rank of a multi-device run: rank 0 reports
        return
    doc = result.to_dict()
    if json_out:
        O.print_json(doc)
    else:
        _render(doc)


def _render(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = doc["metrics"]
    monitor = metrics["monitor"]
    training = doc["training"]
    report = training["parameters"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    train = doc["train"]
    rows = [
        ("task", f"{doc['task']}, mode {doc['mode']}"),
        (
            "trainable",
            (f"{report['trainable']:,} of {report['total']:,} ({100 * report['fraction']:.2f} %)"),
        ),
        (
            "steps",
            (
                f"{training['steps']} ({training['epochs']} epochs)"
                + (
                    f", stopped early at {training['early_stopped_at']}"
                    if training["early_stopped_at"]
                    else ""
                )
            ),
        ),
        ("loss", f"{train['first_loss']:.4f} -> {train['last_loss']:.4f}"),
        (
            "best",
            f"step {metrics['best_step']}: val {monitor} "
            f"{metrics['val'][monitor]:.4f}"
            + (
                f" (untrained head {metrics['val_at_start'][monitor]:.4f})"
                if metrics["val_at_start"]
                else ""
            ),
        ),
        ("output", doc["output"]),
    ]
    for key, value in rows:
        grid.add_row(key, str(value))
    console = Console()
    console.print(grid)
    per_class = "per_class_iou" if doc["task"] == "segmentation" else "per_class_f1"
    table = Table(title=f"per class ({per_class.removeprefix('per_class_')})", title_justify="left")
    table.add_column("class")
    splits = [s for s in ("val", "test") if metrics.get(s)]
    for split in splits:
        table.add_column(split, justify="right")
    for name in doc["classes"]:
        table.add_row(name, *(f"{metrics[s][per_class][name]:.3f}" for s in splits))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
