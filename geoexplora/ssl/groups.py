"""Which trainable parameters belong to which part of an ExPLoRA model, for the per-group
gradient norms of the log and the separate gradient clips of DINOv2.

Groups (trainable parameters only): ``lora`` (the adapters on the frozen blocks' Q and V),
``blocks`` (the blocks trained in full: the last one by default), ``norms_embedding`` (every
other trainable backbone parameter: the norms of the frozen blocks, the final norm, the patch
embedding when it trains, class/register tokens) and ``head`` (the SSL head: DINO/iBOT head or
MAE decoder). A full-parameter run has every block in ``blocks``.
"""

from __future__ import annotations

import re

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _is_lora(name: str) -> bool:
    return "lora_" in name


def backbone_groups(backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``lora`` / ``blocks`` / ``norms_embedding`` of a backbone's trainable parameters."""
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    full_blocks = set()
    for name, p in named:
        m = _BLOCK.search(name)
        if m and not _is_lora(name) and p.ndim >= 2:  # a weight matrix trains: a full block
            full_blocks.add(m.group(1))
    groups: dict[str, list[nn.Parameter]] = {"lora": [], "blocks": [], "norms_embedding": []}
    for name, p in named:
        m = _BLOCK.search(name)
        if _is_lora(name):
            groups["lora"].append(p)
        elif m and m.group(1) in full_blocks:
            groups["blocks"].append(p)
        else:
            groups["norms_embedding"].append(p)
    return groups


def grad_groups(backbone: nn.Module, head: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The four groups of the log (empty ones left out)."""
    groups = backbone_groups(backbone)
    groups["head"] = [p for p in head.parameters() if p.requires_grad]
    return {k: v for k, v in groups.items() if v}
