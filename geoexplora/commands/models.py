"""``geoexplora models``: the registry's backbones and where their weights come from."""

from __future__ import annotations

import typer

from geoexplora.commands import _options as O


def models(json_out: O.Json = False) -> None:
    """List the backbones --init knows by name: parameters, patch size, self-supervised family
    (adapt's default objective), the weights the name means, where they are looked for and
    whether they are in the local cache. Any other timm ViT name works too (family unknown).

    Example: geoexplora models --json | jq '.models[] | select(.weights.cached) | .name'
    """
    from geoexplora.pipelines.models import list_models

    entries = list_models()
    if json_out:
        O.print_json({"models": entries})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("params", "patch", "dim x depth", "family", "weights", "cached")
    table.columns.insert(0, Table("name").columns[0])
    table.columns[0].no_wrap = True
    for m in entries:
        w = m["weights"]
        cached = "-" if w["cached"] is None else ("yes" if w["cached"] else "no")
        table.add_row(
            m["name"],
            f"{m['parameters'] / 1e6:.1f}M",
            str(m["patch_size"]),
            f"{m['embed_dim']} x {m['depth']}",
            m["family"],
            w["needs"] + "".join(f"\n  {where}" for where in w["looked_for"]),
            cached,
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
