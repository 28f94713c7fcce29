"""``geoexplora adapt SCENES_OR_CHIPS... -o OUT``: ExPLoRA extended self-supervised pre-training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoexplora.commands import _options as O
from geoexplora.defaults import DATA, DINOV2, ENGINE, EXPLORA


def adapt(
    output: Annotated[Path, typer.Option("-o", "--output", help="The adapted model file.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scenes (raster files, folders of them, one folder per scene, URIs, STAC items) "
            "or one chips dataset folder (written by tile).",
            metavar="SCENES_OR_CHIPS...",
            show_default=False,
        ),
    ] = None,
    bands: O.Bands = None,
    sensor: O.Sensor = None,
    band_map: O.BandMap = None,
    nodata: O.Nodata = None,
    s2_offset: O.S2Offset = "auto",
    init: O.Init = None,
    init_weights: O.InitWeights = None,
    objective: Annotated[
        str | None,
        typer.Option(
            "--objective",
            help="dinov2 (DINO+iBOT+KoLeo, EMA teacher) or mae; default: the source model's own.",
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Train every parameter (full extended pre-training, for comparison) "
            "instead of ExPLoRA.",
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", help=f"Optimiser steps (default: the preset's, else {DATA.steps})."
        ),
    ] = None,
    epochs: Annotated[
        float | None,
        typer.Option(
            "--epochs",
            help="Passes over the data instead of --steps (for scenes: valid area / window area).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="paper (the published run: global batch 1024, 150k steps, 65536 "
            "prototypes, lr 1e-3) or quick (about one GPU-hour of a ViT-L/14); "
            "options given explicitly override its values (docs/recipe.md).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help=f"Images per device per micro-batch (default: the preset's, else "
            f"{DATA.batch_size}).",
        ),
    ] = None,
    accumulate: Annotated[
        int | None,
        typer.Option(
            "--accumulate",
            help="Micro-batches per optimiser step (gradient accumulation; "
            "default: what --global-batch needs, else 1).",
        ),
    ] = None,
    global_batch: Annotated[
        int | None,
        typer.Option(
            "--global-batch",
            help="Images per optimiser step; sets --accumulate to GLOBAL / "
            "(devices x nodes x batch size), which must divide.",
        ),
    ] = None,
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
    unfreeze_blocks: Annotated[
        str,
        typer.Option(
            "--unfreeze-blocks",
            help="Blocks trained in full, comma-separated; negative counts "
            "from the end (the paper: -1; its [1,L] variant: 0,-1).",
        ),
    ] = ",".join(map(str, EXPLORA.unfreeze_blocks)),
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", help="LoRA rank on Q and V of the other blocks.")
    ] = EXPLORA.lora_rank,
    lora_alpha: Annotated[
        float, typer.Option("--lora-alpha", help="LoRA alpha.")
    ] = EXPLORA.lora_alpha,
    frames: Annotated[
        int | None,
        typer.Option(
            "--frames",
            help="Dates per sample (temporal model with the date encoding); default 1 "
            "for scenes (each date a sample), the dataset's for chips.",
        ),
    ] = None,
    spectral_tokens: Annotated[
        str,
        typer.Option(
            "--spectral-tokens",
            help="bank (one token per patch, any bands) or groups (one token "
            "per patch and Sentinel-2 band group, as SatMAE).",
        ),
    ] = "bank",
    arch: Annotated[
        list[str] | None,
        typer.Option(
            "--arch",
            help="timm architecture override KEY=VALUE (repeatable), e.g. init_values=1.0 "
            "(LayerScale) for a shallow model trained from scratch, or depth=6.",
        ),
    ] = None,
    crop_size: Annotated[
        int,
        typer.Option(
            "--crop-size",
            help="Training window and global crop size in pixels (a multiple of the patch size).",
        ),
    ] = DATA.crop_size,
    context_factor: Annotated[
        float,
        typer.Option(
            "--context-factor",
            help="dinov2 on scenes: cut the global and local crops from a "
            "window of this x --crop-size where the scenes allow (DINOv2 "
            "crops the whole image); 1: from a --crop-size window.",
        ),
    ] = DATA.context_factor,
    local_crop_size: Annotated[
        int | None,
        typer.Option(
            "--local-crop-size", help="dinov2 local crop size (default 7 patches: 98 px)."
        ),
    ] = None,
    local_crops: Annotated[
        int | None,
        typer.Option(
            "--local-crops",
            help=f"dinov2 local crops per image (default: the preset's, else "
            f"{DINOV2.local_crops}).",
        ),
    ] = None,
    head_prototypes: Annotated[
        int | None,
        typer.Option(
            "--head-prototypes",
            help="dinov2 head prototypes (default by model width: 65536 for "
            "ViT-L and ViT-B, 16384 ViT-S, 1024 tiny).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Peak learning rate (default: the recipe's, scaled to the global batch)."
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps", help="Linear warm-up steps (default: 10 % dinov2, 5 % mae)."
        ),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints (OUT-stem.ckpt).")
    ] = ENGINE.checkpoint_every,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers", help="Data-loading workers per device (default: min(4, CPUs-1))."
        ),
    ] = None,
    seed: O.Seed = 0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (parameter report, steps, memory per device) and "
            "its budget (images seen vs the published run, FLOPs per step, "
            "GPU-hours) and stop.",
        ),
    ] = False,
    stop_if_stalled: Annotated[
        bool,
        typer.Option(
            "--stop-if-stalled",
            help="End the run (exit 1, checkpoint kept) once it is not "
            "learning: its KL to the teacher (DINOv2) or its error vs "
            "the mean-patch guess (MAE) stops falling.",
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT-stem.ckpt exactly where it stopped.")
    ] = False,
    overwrite: O.Overwrite = False,
    json_out: O.Json = False,
    stac_search: O.StacSearch = None,
    collection: O.Collection = None,
    bbox: O.Bbox = None,
    datetime: O.Datetime = None,
    max_items: O.MaxItems = 10,
) -> None:
    """Adapt a ViT to your imagery with ExPLoRA: continue its self-supervised pre-training
    (DINOv2 or MAE, as the source was trained) on random windows of the scenes (or the chips of
    a dataset), training LoRA on Q,V of frozen blocks plus the last block, norms and tokens.
    Writes the merged model, a checkpoint, OUT-stem.log.jsonl (all loss terms) and
    OUT-stem.loss.png next to it.

    Example: geoexplora adapt --bands B2,B3,B4,B8 ./scenes -o adapted.pt
    """
    from geoexplora.errors import UserError
    from geoexplora.pipelines.adapt import AdaptConfig
    from geoexplora.pipelines.adapt import adapt as run_adapt

    opts = O.scene_opts(
        bands=bands, sensor=sensor, band_map=band_map, nodata=nodata, s2_offset=s2_offset
    )
    try:
        blocks = [int(v) for v in unfreeze_blocks.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--unfreeze-blocks '{unfreeze_blocks}' is not a list of integers") from exc
    cfg = AdaptConfig(
        arch_overrides=parse_arch_overrides(arch),
        inputs=O.inputs_with_search(inputs, stac_search, collection, bbox, datetime, max_items),
        output=output,
        bands=opts.bands,
        sensor=opts.sensor,
        band_map=opts.band_map,
        nodata=nodata,
        s2_offset=s2_offset,
        init=init,
        init_weights=init_weights,
        objective=objective,
        full=full,
        steps=steps,
        epochs=epochs,
        preset=preset,
        batch_size=batch_size,
        accumulate=accumulate,
        global_batch=global_batch,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        unfreeze_blocks=blocks,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        frames=frames,
        spectral_tokens=spectral_tokens,
        crop_size=crop_size,
        context_factor=context_factor,
        local_crop_size=local_crop_size,
        local_crops=local_crops,
        head_prototypes=head_prototypes,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        num_workers=num_workers,
        seed=seed,
        dry_run=dry_run,
        stop_if_stalled=stop_if_stalled,
        resume=resume,
        overwrite=overwrite,
    )
    result = run_adapt(cfg)
    if result is None:  # another rank of a multi-device run: rank 0 reports
        return
    summary = result.to_dict()
    if json_out:
        O.print_json(summary)
    else:
        _render(summary)


def _render(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    report = summary["parameters"]
    rows = [
        ("objective", summary["objective"]),
        (
            "trainable",
            (f"{report['trainable']:,} of {report['total']:,} ({100 * report['fraction']:.2f} %)"),
        ),
        ("steps", f"{summary['steps']} x global batch {summary['global_batch']}"),
    ]
    if summary.get("dry_run"):
        mem = summary["memory_per_device"]
        rows.append(("memory per device", f"~{mem['total_gib']} GiB"))
        b = summary["budget"]
        rows += [
            (
                "images seen",
                (
                    f"{b['images_seen']:,} ({100 * b['fraction_of_published']:.3g} "
                    f"% of the published run's {b['published_images_seen']:,})"
                ),
            ),
            (
                "compute",
                (
                    f"{b['flops_per_step']:.3g} FLOP per step (fwd+bwd), "
                    f"{b['total_flops']:.3g} in all"
                ),
            ),
            (
                "GPU-hours",
                (
                    f"~{b['gpu_hours']:.3g} on one {b['gpu']} at "
                    f"{100 * b['mfu']:.0f} % MFU ({b['images_per_s']:.0f} images/s)"
                ),
            ),
        ]
    else:
        rows += [
            ("loss", f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"),
            ("learning", summary["stalled"] or "yes (the not-learning rule did not fire)"),
            (
                "speed",
                (
                    f"{summary['images_per_s']:.1f} images/s, "
                    f"{100 * summary['data_wait_fraction']:.0f} % waiting for data"
                ),
            ),
            ("output", summary["output"]),
        ]
    rows += [("warning", w) for w in summary.get("warnings", [])]
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


def parse_arch_overrides(items: list[str] | None) -> dict | None:
    """``["init_values=1.0", "depth=6"]`` -> ``{"init_values": 1.0, "depth": 6}`` (JSON values:
    numbers, true/false, null; anything else is a string)."""
    import json

    from geoexplora.errors import UserError

    if not items:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise UserError(f"--arch '{item}' is not KEY=VALUE (e.g. init_values=1.0)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
