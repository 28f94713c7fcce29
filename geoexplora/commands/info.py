"""``geoexplora info PATH...``: what a raster (or a model file, or a chips dataset) holds."""

from __future__ import annotations

from typing import Annotated

import typer

from geoexplora.commands import _options as O


def info(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Rasters (files or URIs), STAC items, geoexplora model files or chips datasets "
            "(folders)."
        ),
    ],
    sensor: O.Sensor = None,
    band_map: O.BandMap = None,
    s2_offset: O.S2Offset = "auto",
    nodata: O.Nodata = None,
    json_out: O.Json = False,
) -> None:
    """Describe rasters (size, CRS, resolution, dtype, nodata, identified bands, dates), model
    files (the model card) or chips datasets (chips, splits, bands, statistics, classes). A
    folder stands for the rasters under it (as every verb finds them), unless it is a chips
    dataset. Several rasters: also how they group into scenes (see docs/concepts.md).

    Example: geoexplora info scene.tif --json | jq .files[0].bands
    """
    from geoexplora.pipelines.info import describe

    opts = O.scene_opts(sensor=sensor, band_map=band_map, s2_offset=s2_offset, nodata=nodata)
    doc = describe(O.expand_paths(paths), opts)
    if json_out:
        O.print_json(doc)
        return
    for file_doc in doc["files"]:
        render_description(file_doc)
    if len(doc["files"]) > 1 and doc["scenes"]:
        render_scenes(doc["scenes"])


def render_description(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if doc["kind"] == "model":
        console.print(render_model_card(doc))
        return
    if doc["kind"] == "chips":
        _render_dataset(console, doc)
        return
    if doc["kind"] == "stac":
        _render_stac(console, doc)
        return
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]file", doc["path"])
    head.add_row(
        "size", f"{doc['width']} x {doc['height']} px, {doc['count']} band(s), {doc['dtype']}"
    )
    head.add_row("CRS", f"{doc['crs']}")
    head.add_row("resolution", f"{doc['resolution'][0]:g} x {doc['resolution'][1]:g}")
    head.add_row("nodata", "none" if doc["nodata"] is None else f"{doc['nodata']:g}")
    head.add_row("sensor", doc["sensor"] or "unknown (pass --sensor or --band-map)")
    head.add_row("date", doc["date"] or "unknown")
    console.print(head)
    table = Table("#", "description", "band", "sensor", "wavelength nm", "GSD m")
    for b in doc["bands"]:
        table.add_row(
            str(b["index"]),
            b["description"] or "",
            b.get("name", "?"),
            b.get("sensor", ""),
            f"{b['center_nm']:g}" if "center_nm" in b else "",
            f"{b['gsd_m']:g}" if "gsd_m" in b else "",
        )
    console.print(table)


def render_scenes(scenes: list[list[str]]) -> None:
    """How the rasters group into scenes (places), as tile, adapt, predict and embed see them."""
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{len(scenes)} scene(s)[/] (files of one place are its bands or dates):")
    for i, files in enumerate(scenes, start=1):
        console.print(f"  {i}. " + ", ".join(files))


def _render_stac(console, doc: dict) -> None:
    """A STAC document's items: sensor, date and which asset is which band."""
    from rich.table import Table

    console.print(f"[bold]STAC[/] {doc['path']}: {len(doc['items'])} item(s)")
    for item in doc["items"]:
        table = Table(
            "asset",
            "band",
            "common name",
            "nm",
            "scale",
            "add",
            "href",
            title=f"{item['id']} ({item['sensor']}, {item['date'] or 'undated'})",
            title_justify="left",
        )
        for b in item["bands"]:
            table.add_row(
                b["asset"],
                b["key"],
                b["common_name"],
                f"{b['center_nm']:g}",
                "" if b["scale"] is None else f"{b['scale']:g}",
                "" if b["add"] is None else f"{b['add']:g}",
                b["href"],
            )
        console.print(table)


def _render_dataset(console, doc: dict) -> None:
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]chips dataset", doc["path"])
    splits = ", ".join(f"{k} {v}" for k, v in sorted(doc["splits"].items()))
    head.add_row(
        "chips",
        f"{doc['chips']} of {doc['chip_size']} px ({splits}), {doc['num_frames']} date(s) each",
    )
    head.add_row("task", doc["task"])
    head.add_row("bands", ", ".join(doc["bands"]))
    head.add_row("CRS", str(doc["crs"] or "per chip"))
    head.add_row(
        "made",
        f"{doc['created']} from {doc['sources']} source(s)"
        + (f", {doc['appends']} append(s)" if doc["appends"] else ""),
    )
    console.print(head)
    table = Table("band", "mean", "std", "p2", "p98")
    for i, key in enumerate(doc["bands"]):
        table.add_row(key, *(f"{doc['stats'][s][i]:.1f}" for s in ("mean", "std", "p2", "p98")))
    console.print(table)
    if doc["classes"]:
        classes = Table("id", "class", "colour", "chips")
        for c in doc["classes"]:
            classes.add_row(str(c["id"]), c["name"], c["color"], str(c["chips"]))
        console.print(classes)


def render_model_card(card: dict):
    """A rich renderable of :func:`model_card`'s dict (for ``geoexplora info model.pt``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    bb = card["backbone"]
    arch = bb["architecture"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("file", f"{card['file']} ({card['size_bytes'] / 1e6:.1f} MB)"),
        ("sha256", card["sha256"]),
        ("kind", card.get("model_kind", card["kind"])),
        (
            "architecture",
            (
                f"{arch['name']} (timm {arch['timm_name']}): depth {arch['depth']}, "
                f"dim {arch['embed_dim']}, heads {arch['num_heads']}, patch "
                f"{arch['patch_size']}, image {arch['img_size'][0]}x"
                f"{arch['img_size'][1]}, prefix tokens {arch['num_prefix_tokens']}"
            ),
        ),
        (
            "source",
            f"{bb['source'].get('init')} [{bb['family']}]"
            + (f" weights {bb['source']['weights']}" if bb["source"].get("weights") else ""),
        ),
        ("frames", str(bb["num_frames"])),
        (
            "spectral tokens",
            bb["spectral_tokens"]
            + (f" {bb['spectral_groups']}" if bb["spectral_tokens"] == "groups" else ""),
        ),
        (
            "parameters",
            ", ".join(f"{k} {_millions(v)}" for k, v in card["parameter_counts"].items()),
        ),
        ("statistics", bb["stats"]["origin"]),
    ]
    for stage in ("explora", "finetune_lora"):
        if stage in bb:
            s = bb[stage]
            rep = s["parameters"]
            rows.append(
                (
                    stage,
                    (
                        f"unfrozen blocks {s['unfreeze_blocks']}, LoRA "
                        f"r={s['lora_rank']} alpha={s['lora_alpha']} on "
                        f"{','.join(s['lora_targets'])}; trained "
                        f"{_millions(rep['trainable'])} of {_millions(rep['total'])} "
                        f"({100 * rep['fraction']:.1f}%)"
                    ),
                )
            )
    prov = card.get("provenance", {})
    rows.append(
        (
            "created",
            f"{prov.get('created', '?')} with "
            + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items()),
        )
    )
    for key, value in rows:
        summary.add_row(key, value)

    bands = Table(title="bands", title_justify="left")
    for col in ("band", "sensor", "nm", "mean", "std"):
        bands.add_column(col, justify="right" if col in ("nm", "mean", "std") else "left")
    for b, m, s in zip(bb["bands"], bb["stats"]["mean"], bb["stats"]["std"]):
        bands.add_row(b["name"], b["sensor"], f"{b['center_nm']:.1f}", f"{m:.1f}", f"{s:.1f}")
    parts = [summary, bands]
    task = card.get("task")
    if task:
        classes = Table(title=f"task: {task['task']}, head {task['head']}", title_justify="left")
        for col in ("id", "name", "colour"):
            classes.add_column(col)
        for c in task["classes"]:
            color = c.get("color") or ""
            swatch = Text("  ", style=f"on {color}") if color else Text("")
            classes.add_row(str(c["id"]), str(c["name"]), Text.assemble(swatch, " ", color))
        parts.append(classes)
    return Group(*parts)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def register(app: typer.Typer) -> None:
    app.command("info")(info)
