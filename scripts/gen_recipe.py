"""Writes docs/recipe.md: every default of ``geoexplora/defaults.py`` with the published value it
follows ("recipe": the ExPLoRA / DINOv2 / MAE value) or why it departs from it ("ours"), read
from the source with the ``ast`` module so the page cannot drift from the code.

Usage: python scripts/gen_recipe.py > docs/recipe.md; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

DEFAULTS = Path(__file__).resolve().parents[1] / "geoexplora" / "defaults.py"

INTRO = """\
# The recipe: geoexplora's defaults and where each comes from

Generated from `geoexplora/defaults.py` by `scripts/gen_recipe.py`; do not edit by hand.

ExPLoRA (Khanna et al., arXiv 2406.10973) adapts a ViT pre-trained on natural images to a new
domain by continuing its own self-supervised pre-training on unlabeled target images while
training only a small part of it:

- **What trains**: the last transformer block in full; LoRA (rank 64, alpha 1, so a scaling of
  1/64) on the attention Q and V of every other block (K, the attention projection and the MLPs
  stay frozen); every LayerNorm, the class and register tokens; the patch embedding only when
  the input bands differ from the source's (geoexplora's band-aware embedding); the new SSL heads.
  A ViT-L/14 trains about 18.7M of its 304M parameters, a ViT-B/14 about 9.3M of 86M.
- **Objective**: the source's own. DINOv2 sources: DINO + iBOT + KoLeo (weights 1, 1, 0.1) with
  an EMA teacher (momentum 0.992 -> 1), 2 global crops of 224 px and 8 local crops of 98 px,
  Sinkhorn-Knopp centring, AdamW with base lr 1e-3 at an effective batch of 1024 (sqrt scaling),
  weight decay 0.04 -> 0.4, layer decay 0.9, patch-embedding lr x 0.2, drop path 0.3, clip 3.0.
  MAE sources: mask ratio 0.75, pixel loss, AdamW (0.9, 0.95), base lr 4.5e-4 per 256 images.
- **Scale of the published run**: ViT-L/14, effective batch 1024 (8 per GPU x 4 GPUs x 32
  accumulation), about 150k iterations. geoexplora's defaults are sized for a run a user can
  make; where a default departs from the published value the note below says so and why.
- **Afterwards**: LoRA is merged (a plain ViT again); linear probe by DINOv2's protocol (a grid
  of linear heads on frozen features, best on validation, plus k-NN); fine-tuning with LoRA rank
  8 on Q and V of all blocks, lr 5e-4 at batch 128, label smoothing 0.1, drop path 0.2.

In the tables, **recipe** marks the published value (the CLI default equals it), **ours** a choice
the recipe does not make, with its reason; a bare note describes the value.
"""


def _comment(lines: list[str], node: ast.AST) -> str:
    """The ``# ...`` comments on a field's lines (and full-line comments continuing it)."""
    parts = []
    for i in range(node.lineno - 1, node.end_lineno):
        _code, sep, comment = lines[i].partition("  # ")
        if sep:
            parts.append(comment.strip())
    j = node.end_lineno
    while j < len(lines) and lines[j].strip().startswith("# "):
        parts.append(lines[j].strip()[2:])
        j += 1
    return " ".join(parts)


def _sections(tree: ast.Module, lines: list[str]) -> list[tuple[str, str, list[tuple]]]:
    """``[(class name, docstring's first paragraph, [(field, default, note)])]``."""
    out = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or not node.name.endswith("Defaults"):
            continue
        doc = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
        rows = [
            (stmt.target.id, ast.unparse(stmt.value), _comment(lines, stmt))
            for stmt in node.body
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and stmt.value is not None
        ]
        out.append((node.name, doc, rows))
    return out


def _instance_names(tree: ast.Module) -> dict[str, str]:
    """``{"DinoV2Defaults": "DINOV2"}``: the module constant each section is read through."""
    names = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            names[node.value.func.id] = node.targets[0].id
    return names


def _presets(tree: ast.Module) -> list[str]:
    """The ``ADAPT_PRESETS`` table (``--preset``): one row per preset, one column per field."""
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "ADAPT_PRESETS"
            and isinstance(node.value, ast.Dict)
        ):
            rows = [
                (ast.literal_eval(k), {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords})
                for k, v in zip(node.value.keys, node.value.values, strict=True)
            ]
            fields = [f for f in rows[0][1] if f != "why"]
            out = [
                "## `ADAPT_PRESETS` (`adapt --preset NAME`)",
                "",
                (
                    "What each preset sets; options given explicitly override it. The lr is the "
                    "recipe's base lr scaled to the global batch (DINOv2: 1e-3 x sqrt(global / "
                    "1024)); accumulation = global batch / (devices x nodes x batch size)."
                ),
                "",
                "| preset | " + " | ".join(f"`{f}`" for f in fields) + " | source / why |",
                "|---|" + "---|" * len(fields) + "---|",
            ]
            for name, values in rows:
                cells = " | ".join(f"`{values[f]!r}`" for f in fields)
                why = values["why"].replace("|", "\\|")
                out.append(f"| `{name}` | {cells} | {why} |")
            return [*out, ""]
    return []


def render(path: Path = DEFAULTS) -> str:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    names = _instance_names(tree)
    out = [INTRO]
    for cls, doc, rows in _sections(tree, lines):
        out += [f"## `{names.get(cls, cls)}` ({cls})", ""]
        if doc:
            out += [doc, ""]
        out += ["| setting | default | source / why |", "|---|---|---|"]
        for name, value, note in rows:
            note = note.replace("|", "\\|")
            out.append(f"| `{name}` | `{value}` | {note} |")
        out.append("")
        if cls == "ScaleDefaults":
            out += _presets(tree)
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
