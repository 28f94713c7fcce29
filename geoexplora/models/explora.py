"""ExPLoRA parameterisation: what trains during extended pre-training, and merging afterwards.

Freeze everything; unfreeze whole blocks (default the last), every LayerNorm, the class and
register tokens, and the band-aware embedding when the inputs differ from the source's channels;
put LoRA (peft) on Q and V of every other block. timm fuses Q, K and V in one ``qkv`` linear, so
the LoRA blocks get a :class:`SplitQKV` (three linears computing the same output) and peft
targets only ``q`` and ``v``: K never receives an update. :func:`merge_lora` folds the adapters
in and fuses ``qkv`` again, leaving a plain timm ViT. The same function serves fine-tuning's
``lora`` mode (rank 8, all blocks, ``unfreeze_blocks=[]``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from geoexplora.errors import UserError
from geoexplora.models.geovit import GeoViT

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

# lora_targets name -> module path inside a timm block.
LORA_TARGET_MODULES = {
    "q": "attn.qkv.q",
    "k": "attn.qkv.k",
    "v": "attn.qkv.v",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
REPORT_GROUPS = ("embedding", "lora", "unfrozen_blocks", "norms", "tokens", "heads")


class SplitQKV(nn.Module):
    """timm's fused ``qkv`` linear as three linears (same output), so LoRA can target each."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        dim_in, dim_out = qkv.in_features, qkv.out_features // 3
        bias = qkv.bias is not None
        for i, name in enumerate(("q", "k", "v")):
            linear = nn.Linear(
                dim_in, dim_out, bias=bias, device=qkv.weight.device, dtype=qkv.weight.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(qkv.weight[i * dim_out : (i + 1) * dim_out])
                if bias:
                    linear.bias.copy_(qkv.bias[i * dim_out : (i + 1) * dim_out])
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        parts = (self.q, self.k, self.v)
        linear = nn.Linear(
            self.q.in_features,
            3 * self.q.out_features,
            bias=self.q.bias is not None,
            device=self.q.weight.device,
            dtype=self.q.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(torch.cat([p.weight for p in parts]))
            if linear.bias is not None:
                linear.bias.copy_(torch.cat([p.bias for p in parts]))
        return linear


def backbone_of(model: nn.Module) -> tuple[GeoViT, str]:
    """The GeoViT inside ``model`` and its name prefix (``""`` or ``"backbone."``)."""
    for name, module in model.named_modules():
        if isinstance(module, GeoViT):
            return module, f"{name}." if name else ""
    raise TypeError(f"{type(model).__name__} holds no GeoViT")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def apply_explora(
    model: nn.Module,
    unfreeze_blocks=(-1,),
    lora_rank: int = 64,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.0,
    lora_targets=("q", "v"),
    train_embedding: bool | None = None,
    record_as: str = "explora",
) -> dict:
    """Parameterise ``model`` (a GeoViT or a model holding one) in place; returns the report.

    ``train_embedding=None`` decides automatically (trained when the bands differ from the
    source's channels, or with group tokens). Heads outside the backbone stay trainable. The
    settings and report are recorded in the backbone's config under ``record_as``.
    """
    vit, prefix = backbone_of(model)
    depth = vit.depth
    bad = [i for i in unfreeze_blocks if not -depth <= i < depth]
    if bad:
        raise UserError(
            f"unfreeze blocks {bad}: the model has blocks 0..{depth - 1} "
            "(negative indexes count from the end)"
        )
    unfrozen = sorted({i % depth for i in unfreeze_blocks})
    unknown = [t for t in lora_targets if t not in LORA_TARGET_MODULES]
    if unknown:
        raise UserError(f"LoRA targets {unknown}: use any of {', '.join(LORA_TARGET_MODULES)}")
    lora_blocks = [i for i in range(depth) if i not in unfrozen] if lora_rank > 0 else []

    if lora_blocks and lora_targets:
        from peft import LoraConfig, inject_adapter_in_model

        targets = []
        for i in lora_blocks:
            block = cast("Block", vit.vit.blocks[i])
            if {"q", "k", "v"} & set(lora_targets) and isinstance(block.attn.qkv, nn.Linear):
                block.attn.qkv = SplitQKV(block.attn.qkv)
            targets += [f"{prefix}vit.blocks.{i}.{LORA_TARGET_MODULES[t]}" for t in lora_targets]
        # peft annotates lora_alpha as int; a float works (scaling = lora_alpha / r).
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,  # type: ignore[arg-type]
            lora_dropout=lora_dropout,
            target_modules=targets,
            bias="none",
        )
        inject_adapter_in_model(config, model)

    if train_embedding is None:
        train_embedding = not vit.embedding_matches_source()
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if "lora_" in name or not name.startswith(prefix):  # adapters; heads outside the backbone
            param.requires_grad_(True)
    for i in unfrozen:
        vit.vit.blocks[i].requires_grad_(True)
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    for token in (vit.vit.cls_token, vit.vit.reg_token):
        if token is not None:
            token.requires_grad_(True)
    if train_embedding:
        vit.vit.patch_embed.proj.requires_grad_(True)
        if vit.group_embed is not None:
            vit.group_embed.requires_grad_(True)
    if vit.date_encoding is not None:  # new parameters: always trained
        vit.date_encoding.requires_grad_(True)

    report = parameter_report(model)
    vit.config[record_as] = {
        "unfreeze_blocks": unfrozen,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "lora_targets": list(lora_targets),
        "lora_blocks": lora_blocks,
        "train_embedding": bool(train_embedding),
        "parameters": report,
    }
    return report


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (W += B A alpha/r), fuse ``qkv`` again; in place.

    The result is a plain module (no peft layers), loadable without peft.
    """
    if has_lora(model):
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                _set_module(model, name, module.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitQKV):
            _set_module(model, name, module.fused())
    return model


def parameter_report(model: nn.Module) -> dict:
    """Trainable parameters per group, total (the model without LoRA adapters), trainable and
    fraction. A block counts as unfrozen when all its own weights train; its norms are counted
    with it."""
    vit, prefix = backbone_of(model)
    block_re = re.compile(rf"^{re.escape(prefix)}vit\.blocks\.(\d+)\.")
    params = dict(model.named_parameters())
    norm_names = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, nn.LayerNorm)
        for p, _ in m.named_parameters(recurse=False)
    }
    unfrozen = set()
    for i in range(vit.depth):
        own = [
            p
            for n, p in params.items()
            if n.startswith(f"{prefix}vit.blocks.{i}.") and "lora_" not in n
        ]
        if own and all(p.requires_grad for p in own):
            unfrozen.add(i)
    groups = dict.fromkeys(REPORT_GROUPS, 0)
    groups["other"] = 0
    total = trainable = 0
    for name, p in params.items():
        n = p.numel()
        if "lora_" not in name:
            total += n
        if not p.requires_grad:
            continue
        trainable += n
        block = block_re.match(name)
        if "lora_" in name:
            group = "lora"
        elif not name.startswith(prefix):
            group = "heads"
        elif block and int(block.group(1)) in unfrozen:
            group = "unfrozen_blocks"
        elif name in norm_names:
            group = "norms"
        elif name.rsplit(".", 1)[-1] in ("cls_token", "reg_token", "mask_token"):
            group = "tokens"
        elif any(
            part in name for part in ("patch_embed", "group_embed", "date_encoding", "pos_embed")
        ):
            group = "embedding"
        else:
            group = "other"
        groups[group] += n
    if not groups["other"]:
        del groups["other"]
    return {
        "groups": groups,
        "unfrozen_block_indices": sorted(unfrozen),
        "total": total,
        "trainable": trainable,
        "fraction": trainable / total if total else 0.0,
    }
