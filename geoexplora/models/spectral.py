"""Band-aware patch embedding: a wavelength-indexed kernel bank (see ``docs/bands.md``).

The bank holds one patch kernel ``[D, p, p]`` per reference wavelength (the 13 Sentinel-2
centres). A model's conv weight for any band list is a fixed mix of bank entries, piecewise linear
in log-wavelength, so Sentinel-2, Landsat or aerial bands in any order and subset use the same
learned kernels. The bank is initialised from the source model's patch conv so that on the source
bands the embedding computes exactly what the source conv computes; bands the source never saw
start at zero influence (but with a gradient), like LoRA's zero ``B``.

``SpectralProjection`` replaces only ``patch_embed.proj`` of a timm ViT; timm's ``PatchEmbed``
keeps doing padding checks, dynamic image size and layout. In ``groups`` mode (SatMAE-style, the
paper's multispectral model) every band group gets its own bank and the projection stacks the
groups' outputs along the channel axis, ``(B, G*D, h, w)``; the ViT splits them into token sets.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from geoexplora.bands import (
    DEFAULT_SPECTRAL_GROUPS,
    REFERENCE_WAVELENGTHS_NM,
    RGB_WAVELENGTHS_NM,
    SENSORS,
    Band,
    get_band,
    interpolation_weights,
)
from geoexplora.errors import UserError, opt

# Generic RGB sensors: their red/green/blue are what an RGB source model saw, whatever the exact
# filter; their nominal wavelengths are guesses, so they map onto the source's RGB nodes exactly.
_GENERIC_RGB_SENSORS = ("rgb", "rgbn")
_RGB_NAMES = ("red", "green", "blue")
NUM_NODES = len(REFERENCE_WAVELENGTHS_NM)


def band_wavelength(band: Band) -> float:
    """The wavelength a band takes in the kernel bank."""
    if band.sensor in _GENERIC_RGB_SENSORS and band.common_name in _RGB_NAMES:
        return RGB_WAVELENGTHS_NM[_RGB_NAMES.index(band.common_name)]
    return band.center_nm


def mixing_matrix(wavelengths: list[float]) -> torch.Tensor:
    """``(C, K)`` weights of each channel over the bank nodes (rows sum to 1)."""
    return torch.tensor(
        [interpolation_weights(w) for w in wavelengths], dtype=torch.float32, device="cpu"
    )


def init_bank(
    source_weight: torch.Tensor, source_wavelengths: list[float], target_wavelengths: list[float]
) -> torch.Tensor:
    """Bank ``(K, D, p, p)`` that reproduces the source conv on the source channels.

    Source channels on a node are copied to it; otherwise the minimum-norm bank whose mix gives
    the source kernels (exact when the source channels' mixes are independent). Nodes no source
    channel reaches stay zero, unless none of the target bands touches a source node (e.g. an
    RGB source with only NIR/SWIR inputs): then uncovered nodes below the longest source
    wavelength take the source kernels interpolated in log-wavelength (nearest outside), and
    nodes beyond it take the mean source kernel scaled by ``C_source / C_target``, so the input
    starts out seen as a grey image would be.
    """
    weight = source_weight.detach().float()
    dim, n_src, ph, pw = weight.shape
    src_mix = mixing_matrix(source_wavelengths)
    flat = weight.permute(1, 0, 2, 3).reshape(n_src, -1)  # (C_src, D*p*p)
    bank = torch.zeros(NUM_NODES, flat.shape[1], dtype=torch.float32, device=weight.device)
    one_hot = (
        bool(((src_mix == 1.0).sum(1) == 1).all()) and len(set(src_mix.argmax(1).tolist())) == n_src
    )
    if one_hot:
        bank[src_mix.argmax(1).to(bank.device)] = flat
    else:
        bank = (torch.linalg.pinv(src_mix.double()).to(flat.device) @ flat.double()).float()
    covered = src_mix.sum(0) > 0
    target_nodes = mixing_matrix(target_wavelengths).sum(0) > 0
    if not (target_nodes & covered).any():
        _fill_uncovered(bank, covered, flat.mean(0) * n_src / len(target_wavelengths))
    return bank.reshape(NUM_NODES, dim, ph, pw)


def _fill_uncovered(bank: torch.Tensor, covered: torch.Tensor, beyond: torch.Tensor) -> None:
    logs = [math.log(w) for w in REFERENCE_WAVELENGTHS_NM]
    cov = sorted((logs[i], i) for i in range(NUM_NODES) if covered[i])
    longest = cov[-1][0]
    for node in range(NUM_NODES):
        if covered[node]:
            continue
        x = logs[node]
        if x > longest:
            bank[node] = beyond
            continue
        below = [(lg, i) for lg, i in cov if lg <= x]
        above = [(lg, i) for lg, i in cov if lg >= x]
        if not below:
            bank[node] = bank[above[0][1]]
            continue
        (x0, i0), (x1, i1) = below[-1], above[0]
        t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
        bank[node] = (1 - t) * bank[i0] + t * bank[i1]


class KernelBank(nn.Module):
    """One bank and the mix for one band list: a conv ``(B, C, H, W) -> (B, D, h, w)``."""

    def __init__(
        self,
        kernels: torch.Tensor,
        bias: torch.Tensor | None,
        wavelengths: list[float],
        patch_size: tuple[int, int],
    ):
        super().__init__()
        self.kernels = nn.Parameter(kernels.clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.patch_size = tuple(patch_size)
        self.register_buffer(
            "mixing", mixing_matrix(wavelengths).to(kernels.device), persistent=False
        )

    def set_wavelengths(self, wavelengths: list[float]) -> None:
        self.mixing = mixing_matrix(wavelengths).to(self.kernels.device)

    def weight(self) -> torch.Tensor:
        k, d, ph, pw = self.kernels.shape
        mixed = self.mixing.to(self.kernels.dtype) @ self.kernels.reshape(k, -1)
        return mixed.reshape(-1, d, ph, pw).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, stride=self.patch_size)


class SpectralProjection(nn.Module):
    """Drop-in for ``patch_embed.proj``: one kernel bank per band group (one group in bank mode).

    Output ``(B, G*D, h, w)``: group ``g`` occupies channels ``g*D:(g+1)*D``.
    """

    def __init__(
        self,
        source_proj: nn.Conv2d,
        source_wavelengths: list[float],
        bands: list[Band],
        groups: list[list[int]],
    ):
        super().__init__()
        self.embed_dim = source_proj.out_channels
        stride_h, stride_w = source_proj.stride
        self.patch_size = (stride_h, stride_w)
        self.groups = [list(g) for g in groups]
        wavelengths = [band_wavelength(b) for b in bands]
        banks = []
        for group in self.groups:
            target = [wavelengths[i] for i in group]
            kernels = init_bank(source_proj.weight, source_wavelengths, target)
            banks.append(KernelBank(kernels, source_proj.bias, target, self.patch_size))
        self.banks = nn.ModuleList(banks)
        self.wavelengths = wavelengths
        for g, group in enumerate(self.groups):
            self.register_buffer(
                f"band_index_{g}", torch.tensor(group, dtype=torch.long), persistent=False
            )

    def rebuild_buffers(self) -> None:
        """Recompute the buffers derived from the band list (not stored in model files) on the
        parameters' device, e.g. after building on the meta device and loading weights."""
        banks = cast("list[KernelBank]", list(self.banks))
        device = banks[0].kernels.device
        for g, (group, bank) in enumerate(zip(self.groups, banks)):
            setattr(self, f"band_index_{g}", torch.tensor(group, dtype=torch.long, device=device))
            bank.set_wavelengths([self.wavelengths[i] for i in group])

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def set_bands(self, bands: list[Band]) -> None:
        """Re-mix the (trained) bank for another band list (bank mode only)."""
        if self.num_groups != 1:
            raise UserError(
                "a model with spectral group tokens keeps its band groups; "
                f"use the same {opt('bands')}"
            )
        self.groups = [list(range(len(bands)))]
        self.wavelengths = [band_wavelength(b) for b in bands]
        self.rebuild_buffers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self.banks[0](x)
        outs = [
            bank(x.index_select(1, getattr(self, f"band_index_{g}")))
            for g, bank in enumerate(self.banks)
        ]
        return torch.cat(outs, dim=1)


def resolve_groups(bands: list[Band], groups: list[list[str]] | None) -> list[list[int]]:
    """Band groups as index lists into ``bands``.

    Explicit ``groups`` name bands (of the bands' sensor). The default, the three Sentinel-2
    groups, also serves other sensors: each band joins the group of the Sentinel-2 band that
    dominates its wavelength mix. A band in no group is an error (the paper drops B1, B9, B10).
    """
    if groups:
        index = {b.key: i for i, b in enumerate(bands)}
        out = []
        for group in groups:
            idx = []
            for token in group:
                key = get_band(bands[0].sensor, token).key
                if key not in index:
                    raise UserError(
                        f"spectral group band {token} is not among the model's bands "
                        f"({', '.join(b.name for b in bands)})"
                    )
                idx.append(index[key])
            out.append(idx)
    else:
        # The bank's nodes are the Sentinel-2 bands in registry order.
        node_of = {b.name: i for i, b in enumerate(SENSORS["sentinel2"])}
        node_group = {
            node_of[get_band("sentinel2", name).name]: g
            for g, names in enumerate(DEFAULT_SPECTRAL_GROUPS)
            for name in names
        }
        buckets: list[list[int]] = [[] for _ in DEFAULT_SPECTRAL_GROUPS]
        missing = []
        for i, band in enumerate(bands):
            weights = interpolation_weights(band_wavelength(band))
            node = max(range(NUM_NODES), key=lambda k: weights[k])
            if node in node_group:
                buckets[node_group[node]].append(i)
            else:
                missing.append(band.name)
        if missing:
            raise UserError(
                f"bands {', '.join(missing)} fall in no default spectral group "
                f"(B2,B3,B4,B8 | B5,B6,B7,B8A | B11,B12); drop them from {opt('bands')} or "
                "give the groups"
            )
        out = [b for b in buckets if b]
    seen = [i for g in out for i in g]
    if sorted(seen) != list(range(len(bands))):
        dup_or_missing = [bands[i].name for i in range(len(bands)) if seen.count(i) != 1]
        raise UserError(
            f"spectral groups must hold every band exactly once; check {', '.join(dup_or_missing)}"
        )
    return out
