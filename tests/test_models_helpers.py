"""Helpers shared by the model tests: tiny timm ViTs with non-trivial weights, and checkpoint
files in the real key layouts (timm, Meta DINOv2, MAE)."""

from __future__ import annotations

import torch

from geoexplora.bands import get_band
from geoexplora.models.registry import ARCHITECTURES

TINY = "geo_vit_tiny_patch14"
TINY_REG = "geo_vit_tiny_patch14_reg4"
TINY_MAE = "geo_vit_tiny_patch16"


def s2(*names):
    return [get_band("sentinel2", n) for n in names]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from timm's init (whose tiny layer scale and cls token hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def timm_model(arch_name: str, img_size: int = 56, seed: int = 0, **extra):
    """A randomised timm ViT of a registry architecture (headless, dynamic size)."""
    import timm

    arch = ARCHITECTURES[arch_name]
    kwargs = arch.timm_kwargs(dict(num_classes=0, img_size=img_size, dynamic_img_size=True,
                                   **extra))
    return randomise(timm.create_model(arch.timm_name, pretrained=False, **kwargs), seed).eval()


def to_meta_dinov2(timm_sd: dict, reg_tokens: int, seed: int = 1) -> dict:
    """timm DINOv2 keys -> Meta's original layout (pos_embed always carries the cls slot;
    registers as ``register_tokens``; a learned ``mask_token``)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in timm_sd.items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = 0.05 * torch.randn(1, dim, generator=gen)
    if reg_tokens:
        cls_pos = 0.05 * torch.randn(1, 1, dim, generator=gen)
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["register_tokens"] = sd.pop("reg_token")
    return sd


def mae_decoder_state(dim_dec: int = 32, patch: int = 16, chans: int = 3, n_tokens: int = 197):
    gen = torch.Generator().manual_seed(2)
    r = lambda *s: 0.05 * torch.randn(*s, generator=gen)
    return {
        "mask_token": r(1, 1, dim_dec),
        "decoder_embed.weight": r(dim_dec, 64), "decoder_embed.bias": r(dim_dec),
        "decoder_pos_embed": r(1, n_tokens, dim_dec),
        "decoder_blocks.0.norm1.weight": r(dim_dec), "decoder_blocks.0.attn.qkv.weight":
            r(3 * dim_dec, dim_dec),
        "decoder_norm.weight": r(dim_dec), "decoder_norm.bias": r(dim_dec),
        "decoder_pred.weight": r(patch * patch * chans, dim_dec),
        "decoder_pred.bias": r(patch * patch * chans),
    }


def zscore(x: torch.Tensor, bands) -> torch.Tensor:
    mean = torch.tensor([b.mean for b in bands]).view(-1, 1, 1)
    std = torch.tensor([b.std for b in bands]).view(-1, 1, 1)
    return (x - mean) / std
