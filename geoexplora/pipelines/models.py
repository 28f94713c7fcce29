"""``geoexplora models``: the backbones the registry knows, and where their weights come from.

One entry per :data:`geoexplora.models.registry.ARCHITECTURES` name: its shape (parameters,
patch size, width, depth), the self-supervised family (which decides ``adapt``'s default
objective), the published weights the name means, where those are looked for (Hugging Face repo
or URL from timm's pretrained config) and whether they are already in the local cache, so a user
on an offline machine knows before running ``adapt`` which names work without a download.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


def _shape(arch) -> dict:
    """Parameter count and geometry, from a model built on the meta device (no memory, no
    weights: building ViT-g this way takes milliseconds)."""
    import torch

    from geoexplora.models.sources import create_timm_vit

    with torch.device("meta"):
        vit = create_timm_vit(arch, img_size=224)
    return {
        "parameters": sum(p.numel() for p in vit.parameters()),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(vit.blocks[0].attn.num_heads),
        "registers": int(vit.num_prefix_tokens) - 1,
    }


def _weights(arch) -> dict:
    """What ``--init NAME`` (without ``--init-weights``) loads, where from, and if it is cached."""
    if arch.default_tag is None:
        return {
            "tag": None,
            "needs": "--init-weights PATH (a checkpoint) or random",
            "looked_for": [],
            "cached": None,
        }
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{arch.timm_name}.{arch.default_tag}")
    looked_for: list[str] = []
    cached = False
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        looked_for.append(f"hf-hub:{cfg.hf_hub_id}")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            cached = cached or isinstance(hit, str)
    if cfg is not None and cfg.url:
        import torch

        looked_for.append(cfg.url)
        in_hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        cached = cached or in_hub.is_file()
    return {
        "tag": arch.default_tag,
        "needs": f"timm {arch.timm_name}.{arch.default_tag}",
        "looked_for": looked_for,
        "cached": cached,
    }


def list_models() -> list[dict]:
    """One JSON-able dict per registry name, in registry order."""
    from geoexplora.models.registry import ARCHITECTURES

    return [
        {
            "name": arch.name,
            "timm_name": arch.timm_name,
            "family": arch.family,
            "objective": "mae" if arch.family == "mae" else "dinov2",
            **_shape(arch),
            "weights": _weights(arch),
        }
        for arch in ARCHITECTURES.values()
    ]
