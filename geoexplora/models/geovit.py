"""GeoViT: a timm ViT with band-aware patch embedding, per-band normalisation and date tokens.

The wrapped timm ``VisionTransformer`` keeps its blocks, norms, tokens and position embedding;
only ``patch_embed.proj`` is replaced (by :class:`SpectralProjection`). Images come in as
``(B, T, C, H, W)`` canonical units (reflectance x 10000, NaN = nodata); the model z-scores them
with its own per-band statistics, so callers never normalise.

Token layout after the ``P`` prefix tokens (cls, registers): frame-major, then spectral group,
then patch row-major: token ``P + (t*G + g)*N + n``. With one date and bank tokens (``T = G = 1``)
this is exactly the source ViT's sequence, and the outputs equal the source model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from geoexplora.bands import Band, band_from_key
from geoexplora.errors import UserError, opt
from geoexplora.models.spectral import SpectralProjection, band_wavelength, mixing_matrix
from geoexplora.models.temporal import DateEncoding

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block, VisionTransformer

SPECTRAL_TOKEN_MODES = ("bank", "groups")


class GeoViT(nn.Module):
    """Backbone. ``config`` (JSON-able) describes it fully, for the model file."""

    vit: VisionTransformer
    band_mean: torch.Tensor
    band_std: torch.Tensor
    group_embed: nn.Parameter | None
    date_encoding: DateEncoding | None
    meta: dict  # the model file's metadata, set by ``load_model``

    def __init__(
        self,
        vit: VisionTransformer,
        bands: list[Band],
        mean: list[float],
        std: list[float],
        source_wavelengths: list[float],
        groups: list[list[int]],
        num_frames: int = 1,
        spectral_tokens: str = "bank",
        mask_token: torch.Tensor | None = None,
        config: dict | None = None,
    ):
        super().__init__()
        if spectral_tokens not in SPECTRAL_TOKEN_MODES:
            raise UserError(
                f"spectral tokens {spectral_tokens!r}: use one of {', '.join(SPECTRAL_TOKEN_MODES)}"
            )
        if num_frames < 1:
            raise UserError(f"number of frames must be at least 1, not {num_frames}")
        vit.patch_embed.proj = SpectralProjection(
            vit.patch_embed.proj, source_wavelengths, bands, groups
        )
        self.vit = vit
        self.bands = list(bands)
        self.num_frames = num_frames
        self.spectral_tokens = spectral_tokens
        self.source_wavelengths = list(source_wavelengths)
        dim = vit.embed_dim
        self.register_buffer("band_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("band_std", torch.tensor(std, dtype=torch.float32))
        # DINOv2's iBOT mask token (from Meta's checkpoint when given; DINOv2 initialises it to 0).
        self.mask_token = nn.Parameter(
            mask_token.reshape(1, dim).clone() if mask_token is not None else torch.zeros(1, dim)
        )
        self.group_embed = None
        if spectral_tokens == "groups":
            self.group_embed = nn.Parameter(torch.zeros(len(groups), dim))
            nn.init.trunc_normal_(self.group_embed, std=0.02)
        self.date_encoding = DateEncoding(dim) if num_frames > 1 else None
        self.config = dict(config or {})
        self.mae_decoder_state: dict[str, torch.Tensor] = {}
        self.grad_checkpointing = False

    # --- description -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_groups(self) -> int:
        return self.vit.patch_embed.proj.num_groups

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.vit.patch_embed.dynamic_feat_size((height, width))

    def embedding_matches_source(self) -> bool:
        """True when the inputs are exactly the source's channels (in any order), so the patch
        embedding needs no training (ExPLoRA keeps it frozen then)."""
        if self.spectral_tokens != "bank" or len(self.bands) != len(self.source_wavelengths):
            return False
        ours = sorted(map(tuple, mixing_matrix([band_wavelength(b) for b in self.bands]).tolist()))
        theirs = sorted(map(tuple, mixing_matrix(self.source_wavelengths).tolist()))
        return ours == theirs

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # --- re-targeting a trained backbone (continue adapting with other bands / dates) ----------
    def set_bands(self, bands: list[Band], mean: list[float], std: list[float]) -> None:
        self.vit.patch_embed.proj.set_bands(bands)
        self.bands = list(bands)
        device = self.band_mean.device
        self.band_mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.band_std = torch.tensor(std, dtype=torch.float32, device=device)

    def set_num_frames(self, num_frames: int) -> None:
        if num_frames > 1 and self.date_encoding is None:
            self.date_encoding = DateEncoding(self.embed_dim).to(self.band_mean.device)
        elif num_frames == 1:
            self.date_encoding = None
        self.num_frames = num_frames

    # --- forward -----------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Per-band z-score of canonical units; nodata (NaN) and non-finite values become 0, the
        band mean."""
        shape = (1,) * (x.dim() - 3) + (-1, 1, 1)
        z = (x - self.band_mean.view(shape)) / self.band_std.view(shape)
        return torch.where(torch.isfinite(z), z, torch.zeros_like(z))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5:
            raise ValueError(f"expected images (B, T, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] != len(self.bands):
            raise ValueError(
                f"expected {len(self.bands)} bands "
                f"({', '.join(b.name for b in self.bands)}), got {x.shape[2]}"
            )
        if x.shape[1] != self.num_frames:
            raise ValueError(f"expected {self.num_frames} frame(s), got {x.shape[1]}")
        return x

    def embed(
        self,
        x: torch.Tensor,
        dates: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens ``(B, P + T*G*N, D)`` before the blocks.

        ``dates``: ``(B, T)`` float days since 1970-01-01 (NaN unknown; None: no date signal).
        ``patch_mask``: ``(B, T*G*N)`` bool, True = replace the patch by the mask token (iBOT).
        MAE-style dropping is the caller's: gather the visible tokens of this output.
        """
        x = self._check_input(x)
        b, t = x.shape[:2]
        vit = self.vit
        feat = vit.patch_embed(self.normalise(x).flatten(0, 1))  # (B*T, h, w, G*D), NHWC
        h, w = feat.shape[1:3]
        g, d = self.num_groups, self.embed_dim
        feat = feat.reshape(b, t, h * w, g, d).permute(0, 1, 3, 2, 4)  # (B, T, G, N, D)
        if patch_mask is not None:
            mask = patch_mask.reshape(b, t, g, h * w, 1)
            feat = torch.where(mask, self.mask_token.to(feat.dtype).view(1, 1, 1, 1, d), feat)
        pos_prefix, pos_patch = self._position_embedding(h, w)
        feat = feat + pos_patch.view(1, 1, 1, h * w, d)
        if self.group_embed is not None:
            feat = feat + self.group_embed.view(1, 1, g, 1, d)
        if self.date_encoding is not None and dates is not None:
            feat = feat + self.date_encoding(dates.to(feat.device)).view(b, t, 1, 1, d)
        assert vit.cls_token is not None  # create_timm_vit refuses ViTs without a class token
        prefix_tokens = [vit.cls_token.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix_tokens.append(vit.reg_token.expand(b, -1, -1))
        prefix = torch.cat(prefix_tokens, dim=1)
        if pos_prefix is not None:
            prefix = prefix + pos_prefix
        tokens = torch.cat([prefix, feat.reshape(b, t * g * h * w, d)], dim=1)
        return vit.norm_pre(vit.pos_drop(tokens))

    def _position_embedding(self, h: int, w: int):
        """(prefix part or None, patch part ``(1, N, D)``), resampled to the grid as timm does."""
        from timm.layers import resample_abs_pos_embed

        vit = self.vit
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(
            vit.pos_embed,
            new_size=(h, w),
            old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=n_prefix,
        )
        return (pos[:, :n_prefix] if n_prefix else None), pos[:, n_prefix:]

    def token_mask(self, frame_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, T)`` valid frames -> ``(B, L)`` tokens that may be attended to."""
        h, w = self.grid_size(height, width)
        per_frame = frame_mask.bool().repeat_interleave(self.num_groups * h * w, dim=1)
        prefix = per_frame.new_ones(frame_mask.shape[0], self.num_prefix_tokens)
        return torch.cat([prefix, per_frame], dim=1)

    def _blocks(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None):
        """Yield the output of every block. ``attn_mask``: ``(B, L)`` bool, True = may be
        attended to (masked tokens still attend to the others)."""
        mask = attn_mask[:, None, None, :] if attn_mask is not None else None
        x = tokens
        for blk in self.vit.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
            yield x

    def encode(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks and final norm: ``(B, L, D)`` -> normed ``(B, L, D)``. ``attn_mask``: ``(B, L)``
        bool, True = the token may be attended to (see :meth:`token_mask`)."""
        x = tokens
        for x in self._blocks(tokens, attn_mask):  # noqa: B007 - keeps the last block's output
            continue
        return self.vit.norm(x)

    def _key_mask(self, x: torch.Tensor, frame_mask: torch.Tensor | None):
        if frame_mask is None or self.num_frames == 1:
            return None
        if bool(frame_mask.all()):
            return None  # no mask: keeps the fused attention kernels
        return self.token_mask(frame_mask.to(x.device), x.shape[-2], x.shape[-1])

    def forward_features(
        self,
        x: torch.Tensor,
        dates: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        cls_blocks: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``cls (B, D)``, ``patch (B, T, N, D)`` (groups averaged), ``prefix (B, P, D)``, normed.

        ``frame_mask``: ``(B, T)`` bool, True = valid frame; invalid frames are not attended to.
        ``cls_blocks`` > 0 adds ``cls_blocks (B, n*D)``: the normed class tokens of the last n
        blocks (DINOv2's linear-probe features), from the same forward pass.
        """
        x = self._check_input(x)
        outs = self._blocks(self.embed(x, dates, patch_mask), self._key_mask(x, frame_mask))
        if cls_blocks <= 0:
            for last in outs:  # noqa: B007 - keeps the last block's output
                continue
            return self._split(self.vit.norm(last), x)
        kept = list(outs)
        features = self._split(self.vit.norm(kept[-1]), x)
        features["cls_blocks"] = torch.cat(
            [self.vit.norm(o[:, 0]) for o in kept[-cls_blocks:]], dim=-1
        )
        return features

    def _split(self, out: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = x.shape[:2]
        p = self.num_prefix_tokens
        patch = out[:, p:].reshape(b, t, self.num_groups, -1, self.embed_dim).mean(dim=2)
        return {"cls": out[:, 0], "patch": patch, "prefix": out[:, :p]}

    forward = forward_features

    def get_intermediate_cls(
        self,
        x: torch.Tensor,
        n: int = 4,
        dates: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Concatenated class tokens of the last ``n`` blocks, each through the final norm
        (DINOv2's linear-probe features): ``(B, n*D)``."""
        return self.forward_features(x, dates, frame_mask, cls_blocks=n)["cls_blocks"]


# --- construction ----------------------------------------------------------------------------


def as_bands(bands) -> list[Band]:
    return [b if isinstance(b, Band) else band_from_key(b) for b in bands]


def resolve_stats(
    bands: list[Band], stats: dict | None, source_normalisation: dict | None = None
) -> tuple[list, list, str]:
    """(mean, std, origin): the source's own normalisation where it has one (torchgeo
    Sentinel-2 weights expect exactly it), else ``stats`` (from the data), else the bands'
    fall-back statistics; an error naming the bands when none applies."""
    for origin, chosen in (("source", source_normalisation), ("data", stats)):
        if chosen:
            mean, std = [float(v) for v in chosen["mean"]], [float(v) for v in chosen["std"]]
            if len(mean) != len(bands) or len(std) != len(bands):
                raise UserError(
                    f"statistics ({origin}) have {len(mean)} means / {len(std)} stds "
                    f"for {len(bands)} bands"
                )
            break
    else:
        lacking = [b.key for b in bands if b.mean is None or b.std is None]
        if lacking:
            raise UserError(
                f"no statistics for bands {', '.join(lacking)}: compute them from "
                "your data (geoexplora tile writes them to dataset.json)"
            )
        # Every band has both here (``lacking`` is empty).
        mean = [b.mean for b in bands if b.mean is not None]
        std = [b.std for b in bands if b.std is not None]
        origin = "fallback"
    bad = [b.key for b, s in zip(bands, std) if not s > 0]
    if bad:
        raise UserError(
            f"band statistics: std must be positive; check {', '.join(bad)} "
            f"(a constant band carries no information: drop it from {opt('bands')})"
        )
    return mean, std, origin


def backbone_config(
    vit: VisionTransformer,
    arch,
    img_size,
    bands,
    mean,
    std,
    stats_origin,
    num_frames,
    spectral_tokens,
    groups,
    source_wavelengths,
    family,
    provenance,
) -> dict:
    size = vit.patch_embed.img_size
    return {
        "architecture": {
            "name": arch.name,
            "timm_name": arch.timm_name,
            "overrides": dict(arch.overrides),
            "img_size": list(size),
            "patch_size": vit.patch_embed.patch_size[0],
            "embed_dim": vit.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": cast("Block", vit.blocks[0]).attn.num_heads,
            "num_prefix_tokens": vit.num_prefix_tokens,
            "reg_tokens": vit.num_reg_tokens,
        },
        "family": family,
        "bands": [{**b.to_dict(), "key": b.key} for b in bands],
        "stats": {"mean": list(mean), "std": list(std), "origin": stats_origin},
        "num_frames": num_frames,
        "spectral_tokens": spectral_tokens,
        "spectral_groups": [list(g) for g in groups],
        "source": {**provenance, "channels_nm": list(source_wavelengths)},
    }


def geovit_from_config(config: dict) -> GeoViT:
    """An untrained GeoViT shaped as ``config`` describes (weights are loaded afterwards)."""
    from geoexplora.models.registry import Architecture
    from geoexplora.models.sources import create_timm_vit

    a = config["architecture"]
    arch = Architecture(a["name"], a["timm_name"], config["family"], dict(a["overrides"]))
    source_nm = config["source"]["channels_nm"]
    vit = create_timm_vit(arch, tuple(a["img_size"]), in_chans=len(source_nm))
    bands = [band_from_key(b["key"]) for b in config["bands"]]
    return GeoViT(
        vit,
        bands,
        config["stats"]["mean"],
        config["stats"]["std"],
        source_nm,
        config["spectral_groups"],
        config["num_frames"],
        config["spectral_tokens"],
        None,
        config,
    )
