"""Building backbones from what a user names (timm's ``_builder`` role): a registry name or timm
name with ``--init-weights``, ``torchgeo:ENUM``, or a geoexplora model file re-targeted to other
bands or dates. :mod:`geoexplora.models.geovit` holds the module itself and
:func:`~geoexplora.models.geovit.geovit_from_config`; this module may import the model file
(:mod:`geoexplora.models.file`), which imports geovit, without a cycle.
"""

from __future__ import annotations

from geoexplora.errors import UserError, opt
from geoexplora.models.geovit import GeoViT, as_bands, backbone_config, resolve_stats


def build_backbone(
    init: str | None = None,
    init_weights: str | None = None,
    bands: list | None = None,
    stats: dict | None = None,
    img_size: int = 224,
    num_frames: int = 1,
    spectral_tokens: str = "bank",
    spectral_groups: list[list[str]] | None = None,
    arch_overrides: dict | None = None,
    drop_path_rate: float = 0.0,
) -> GeoViT:
    """Build a :class:`GeoViT` from ``--init`` / ``--init-weights`` (see ``resolve_init``).

    ``bands``: :class:`Band` objects or ``sensor:name`` keys, in input order. Default: the
    source's bands (torchgeo), or Sentinel-2 B4,B3,B2 for RGB sources (the source's own
    channels in the Sentinel-2 band system). ``stats``: ``{"mean": [...], "std": [...]}`` per
    band in canonical units. ``spectral_groups`` (groups mode): band names per group; default the
    three Sentinel-2 groups. ``arch_overrides``: timm keyword overrides (depth, embed_dim,
    num_heads, ...), for custom configurations.

    From a geoexplora model file, the trained backbone is re-targeted: other bands re-mix its
    kernel bank, another number of dates adds (or drops) the date encoding.
    """
    from geoexplora.models.registry import resolve_init
    from geoexplora.models.sources import load_source
    from geoexplora.models.spectral import resolve_groups

    spec = resolve_init(init, init_weights)
    if spec.kind == "model_file":
        return backbone_from_file(
            spec, bands, stats, num_frames, spectral_tokens, spectral_groups, arch_overrides
        )
    source = load_source(spec, img_size, arch_overrides, drop_path_rate)
    if bands is None:
        from geoexplora.bands import get_band

        bands = source.bands or [get_band("sentinel2", n) for n in ("B4", "B3", "B2")]
    bands = as_bands(bands)
    mean, std, origin = resolve_stats(bands, stats, source.normalisation)
    if spectral_tokens == "groups":
        groups = resolve_groups(bands, spectral_groups)
    else:
        groups = [list(range(len(bands)))]
    config = backbone_config(
        source.vit,
        source.arch,
        img_size,
        bands,
        mean,
        std,
        origin,
        num_frames,
        spectral_tokens,
        groups,
        source.wavelengths,
        source.family,
        {**spec.describe(), **source.provenance},
    )
    model = GeoViT(
        source.vit,
        bands,
        mean,
        std,
        source.wavelengths,
        groups,
        num_frames,
        spectral_tokens,
        source.mask_token,
        config,
    )
    model.mae_decoder_state = source.mae_decoder_state
    return model


def backbone_from_file(
    spec, bands, stats, num_frames, spectral_tokens, spectral_groups, arch_overrides
) -> GeoViT:
    from geoexplora.models.file import load_model
    from geoexplora.models.heads import TaskModel
    from geoexplora.provenance import sha256_file

    if arch_overrides:
        raise UserError(f"{opt('init')} {spec.init} is a model file; its architecture is fixed")
    model = load_model(spec.model_path)
    vit = model.backbone if isinstance(model, TaskModel) else model
    if spectral_tokens != vit.spectral_tokens:
        raise UserError(
            f"{opt('init')} {spec.init} uses {vit.spectral_tokens} spectral tokens; keep "
            "the same spectral-token mode to continue adapting it"
        )
    config = dict(vit.config)
    if bands is not None:
        bands = as_bands(bands)
        if [b.key for b in bands] != [b.key for b in vit.bands]:
            known = {
                b.key: (m, s)
                for b, m, s in zip(
                    vit.bands, vit.config["stats"]["mean"], vit.config["stats"]["std"]
                )
            }
            if stats is None and all(b.key in known for b in bands):
                stats = {
                    "mean": [known[b.key][0] for b in bands],
                    "std": [known[b.key][1] for b in bands],
                }
            mean, std, origin = resolve_stats(bands, stats)
            vit.set_bands(bands, mean, std)
            config["bands"] = [{**b.to_dict(), "key": b.key} for b in bands]
            config["spectral_groups"] = [list(range(len(bands)))]
            config["stats"] = {"mean": mean, "std": std, "origin": origin}
        elif stats is not None:
            mean, std, origin = resolve_stats(bands, stats)
            vit.set_bands(bands, mean, std)
            config["stats"] = {"mean": mean, "std": std, "origin": origin}
    if num_frames != vit.num_frames:
        vit.set_num_frames(num_frames)
        config["num_frames"] = num_frames
    config["source"] = {
        **config["source"],
        "continued_from": str(spec.model_path),
        "continued_from_sha256": sha256_file(spec.model_path),
    }
    vit.config = config
    return vit
