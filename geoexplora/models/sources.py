"""Initial weights: build the timm ViT named by an :class:`InitSpec` and load its weights.

Sources: a timm name's published weights (hub download, or the warm cache offline), a local
checkpoint (timm, Meta DINOv2, MAE with or without decoder), a torchgeo weight enum (its bands and
normalisation come along), or an explicit random initialisation. A model that cannot be had
offline is a UserError naming the file to provide and where to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from geoexplora.bands import RGB_WAVELENGTHS_NM, Band, find_band
from geoexplora.errors import UserError, opt
from geoexplora.log import library_warnings_quiet, logger
from geoexplora.models.checkpoints import (
    checkpoint_layout,
    load_into_vit,
    meta_mask_token,
    read_checkpoint,
    split_mae_decoder,
    to_timm_layout,
)
from geoexplora.models.registry import Architecture, InitSpec, get_architecture, source_family
from geoexplora.provenance import sha256_file

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# torchgeo enum name prefix -> our sensor. Sentinel-1 (SAR) has no place on a wavelength axis.
_TORCHGEO_SENSORS = (
    ("SENTINEL2", "sentinel2"),
    ("LANDSAT_OLI", "landsat8"),
    ("LANDSAT_ETM", "landsat7"),
    ("LANDSAT_TM", "landsat5"),
)


@dataclass
class Source:
    """A loaded source model and what we know about its input."""

    vit: VisionTransformer
    arch: Architecture
    family: str
    wavelengths: list[float]  # one per input channel of the source patch conv
    bands: list[Band] | None = None  # when the source names its bands (torchgeo)
    normalisation: dict | None = None  # {"mean": [...], "std": [...]} in canonical units
    mask_token: torch.Tensor | None = None
    mae_decoder_state: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


def create_timm_vit(
    arch: Architecture,
    img_size: int | tuple[int, int],
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    pretrained_tag: str | None = None,
) -> VisionTransformer:
    """A headless timm ViT with dynamic image size; ``pretrained_tag`` loads published weights."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    name = f"{arch.timm_name}.{pretrained_tag}" if pretrained_tag else arch.timm_name
    kwargs = arch.timm_kwargs(
        {
            "num_classes": 0,
            "img_size": img_size,
            "dynamic_img_size": True,
            "in_chans": in_chans,
            "drop_path_rate": drop_path_rate,
        }
    )
    try:
        vit = timm.create_model(name, pretrained=pretrained_tag is not None, **kwargs)
    except TypeError as exc:  # a CNN (or other family) refuses the ViT keywords
        raise UserError(
            f"{opt('init')} {arch.name}: not a ViT with a class token (timm cannot build "
            f"it as one: {exc}); use a ViT such as vit_small_patch14_dinov2"
        ) from exc
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        raise UserError(
            f"{opt('init')} {arch.name}: not a ViT with a class token (timm "
            f"{type(vit).__name__}); use a ViT such as vit_small_patch14_dinov2"
        )
    return vit


def load_source(
    spec: InitSpec, img_size, arch_overrides: dict | None = None, drop_path_rate: float = 0.0
) -> Source:
    if spec.kind == "torchgeo":
        return _load_torchgeo(spec, img_size, arch_overrides, drop_path_rate)
    if spec.kind != "timm":
        raise ValueError(f"load_source handles timm and torchgeo specs, not {spec.kind}")
    assert spec.arch_name is not None  # resolve_init sets it for timm specs
    arch = get_architecture(spec.arch_name, arch_overrides)
    family = source_family(spec, arch)
    rgb = list(RGB_WAVELENGTHS_NM)
    if spec.weights == "random":
        vit = create_timm_vit(arch, img_size, drop_path_rate=drop_path_rate)
        return Source(vit, arch, family, rgb, provenance={"weights": "random"})
    if spec.weights == "pretrained":
        vit = _create_pretrained(arch, spec.tag, img_size, drop_path_rate)
        return Source(
            vit, arch, family, rgb, provenance={"weights": f"timm:{arch.timm_name}.{spec.tag}"}
        )
    path = Path(spec.weights)
    vit = create_timm_vit(arch, img_size, drop_path_rate=drop_path_rate)
    sd = read_checkpoint(path)
    layout = checkpoint_layout(sd)
    encoder, decoder = split_mae_decoder(sd)
    mask_token = meta_mask_token(encoder)
    load_into_vit(vit, to_timm_layout(encoder, vit), f"--init-weights {path}")
    if layout == "mae_with_decoder":
        family = "mae"
    elif layout == "meta_dinov2":
        family = "dinov2"
    return Source(
        vit,
        arch,
        family,
        rgb,
        mask_token=mask_token,
        mae_decoder_state=decoder,
        provenance={"weights": str(path), "sha256": sha256_file(path), "layout": layout},
    )


def _create_pretrained(
    arch: Architecture, tag: str | None, img_size, drop_path_rate: float
) -> VisionTransformer:
    import timm

    try:
        with library_warnings_quiet("huggingface_hub"):
            return create_timm_vit(
                arch, img_size, drop_path_rate=drop_path_rate, pretrained_tag=tag
            )
    except OSError as exc:  # no network and not in the cache (hub and URL downloads)
        cfg = timm.models.get_pretrained_cfg(f"{arch.timm_name}.{tag}")
        where = []
        if cfg is not None and cfg.hf_hub_id:
            where.append(f"Hugging Face repo {cfg.hf_hub_id}")
        if cfg is not None and isinstance(cfg.url, str) and cfg.url:
            where.append(cfg.url)
        raise UserError(
            f"weights {arch.timm_name}.{tag} are not in the local cache and cannot be downloaded "
            f'({type(exc).__name__}); on a connected machine fill the cache (python -c "import '
            f"timm; timm.create_model('{arch.timm_name}.{tag}', pretrained=True)\") or download "
            f"{' or '.join(where) or 'the checkpoint'} and pass {opt('init_weights')} PATH"
        ) from exc


def _torchgeo_enum(name: str):
    import torchgeo.models

    cls_name, _, member = name.partition(".")
    enum_cls = getattr(torchgeo.models, cls_name, None)
    if enum_cls is None or not hasattr(enum_cls, "__members__"):
        raise UserError(
            f"{opt('init')} torchgeo:{name}: torchgeo has no weights enum {cls_name} "
            "(e.g. torchgeo:ViTSmall16_Weights.SENTINEL2_ALL_DINO)"
        )
    if member not in enum_cls.__members__:
        raise UserError(
            f"{opt('init')} torchgeo:{name}: {cls_name} has no member {member!r}; it has "
            f"{', '.join(enum_cls.__members__)}"
        )
    return enum_cls[member]


def _torchgeo_bands(weights, label: str) -> list[Band]:
    member = weights.name
    sensor = next((s for prefix, s in _TORCHGEO_SENSORS if member.startswith(prefix)), None)
    names = list(weights.meta.get("bands") or [])
    if sensor is None or not names:
        raise UserError(
            f"{opt('init')} {label}: its inputs ({', '.join(names) or 'unknown bands'}) are "
            "not optical bands with known wavelengths"
        )
    bands = []
    for name in names:
        band = find_band(sensor, name.removeprefix("SR_"))
        if band is None:
            raise UserError(
                f"{opt('init')} {label}: band {name} (thermal or unknown) has no place in the "
                "wavelength-indexed patch embedding"
            )
        bands.append(band)
    return bands


def _torchgeo_normalisation(weights, sensor: str, channels: int) -> dict | None:
    """The enum's own Normalize, when its units are ours (Sentinel-2 DN = reflectance x 10000).

    SSL4EO-L Landsat weights were trained on 8-bit rescaled products, a unit we never produce, so
    their normalisation is not reused.
    """
    if sensor != "sentinel2":
        return None
    transforms = weights.transforms
    for module in transforms.modules() if isinstance(transforms, nn.Module) else ():
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if mean is not None and std is not None:
            mean, std = [float(v) for v in mean], [float(v) for v in std]
            if len(mean) == 1:
                mean, std = mean * channels, std * channels
            return {"mean": mean, "std": std}
    return None


def _load_torchgeo(spec: InitSpec, img_size, arch_overrides, drop_path_rate) -> Source:
    label = spec.init
    assert spec.torchgeo_enum is not None  # resolve_init sets it for torchgeo specs
    weights = _torchgeo_enum(spec.torchgeo_enum)
    bands = _torchgeo_bands(weights, label)
    arch = get_architecture(weights.meta["model"], arch_overrides)
    vit = create_timm_vit(
        arch, img_size, in_chans=weights.meta["in_chans"], drop_path_rate=drop_path_rate
    )
    path = Path(spec.weights) if spec.weights != "pretrained" else _torchgeo_file(weights, label)
    sd = read_checkpoint(path)
    load_into_vit(vit, to_timm_layout(sd, vit), f"{label} ({path})")
    family = (
        "dinov2"
        if weights.meta.get("ssl_method") in ("dino", "softcon")
        else ("mae" if weights.meta.get("ssl_method") == "mae" else "unknown")
    )
    return Source(
        vit,
        arch,
        family,
        [b.center_nm for b in bands],
        bands=bands,
        normalisation=_torchgeo_normalisation(weights, bands[0].sensor, len(bands)),
        provenance={
            "weights": f"{label}",
            "file": str(path),
            "url": weights.url,
            "sha256": sha256_file(path),
        },
    )


def _torchgeo_file(weights, label: str) -> Path:
    """The enum's checkpoint from the torch hub cache, downloading it if absent."""
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s", url)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)
    except OSError as exc:
        raise UserError(
            f"{opt('init')} {label}: {cached.name} is not cached and cannot be downloaded "
            f"({type(exc).__name__}); download {url} on a connected machine and pass "
            f"{opt('init_weights')} PATH (or place it at {cached})"
        ) from exc
    return cached
