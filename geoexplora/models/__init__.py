"""Backbones (timm ViTs), band-aware patch embedding, temporal encoding, ExPLoRA, heads and the
model file. Imports torch: only commands import this package, at run time."""

from geoexplora.models.builder import build_backbone
from geoexplora.models.explora import apply_explora, merge_lora, parameter_report
from geoexplora.models.geovit import GeoViT
from geoexplora.models.registry import ARCHITECTURES, DEFAULT_INIT, InitSpec, resolve_init

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_INIT",
    "GeoViT",
    "InitSpec",
    "apply_explora",
    "build_backbone",
    "merge_lora",
    "parameter_report",
    "resolve_init",
]
