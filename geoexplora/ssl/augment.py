"""Augmentations for multispectral and temporal image tensors, split in two halves.

*Drawing* (:func:`draw_view`, numpy, in DataLoader workers): the random parameters of one view
of one sample, from that sample's own generator, so a sample's augmentation does not depend on
the worker, the rank or the batch it lands in (exact resume; DDP = one process with the global
batch). *Rendering* (:func:`render_views`, torch, batched on the training device): crops,
flips, 90-degree rotations, brightness/contrast (and a per-band gain), saturation, hue (RGB
only), grey-scale, blur and solarisation, in DINOv2's order, for any number of bands and dates.
With ``rgb`` (the indices of red, green, blue) the colour ops are torchvision's; otherwise their
spectral analogues (see :class:`geoexplora.defaults.AugmentDefaults` and :func:`grey`).

Geometry is one affine sampling grid per view (``grid_sample``): a random resized crop composed
with flips and rotations, identical for every date and band of a sample. Nodata (NaN) survives:
pixels are filled with the band's mean for the interpolation and set back to NaN where the
output pixel is mostly nodata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geoexplora.defaults import AUGMENT, AugmentDefaults

_ROTATIONS = [
    np.array([[1, 0], [0, 1]]),
    np.array([[0, -1], [1, 0]]),
    np.array([[-1, 0], [0, -1]]),
    np.array([[0, 1], [-1, 0]]),
]


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: output size (pixels), crop scale range (fraction of the input area),
    blur probability."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    solarize_p: float = 0.0


def random_resized_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
):
    """(top, left, h, w) in pixels, torchvision's RandomResizedCrop rule (without rounding)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            return rng.uniform(0, height - h), rng.uniform(0, width - w), h, w
    side = min(height, width)  # fall back to a central square crop
    return (height - side) / 2, (width - side) / 2, side, side


def draw_view(
    rng: np.random.Generator,
    height: int,
    width: int,
    bands: int,
    spec: ViewSpec,
    aug: AugmentDefaults = AUGMENT,
) -> dict[str, np.ndarray]:
    """Parameters of one view of a ``height x width`` image with ``bands`` bands.

    ``theta`` (2, 3): the affine map from output to input coordinates (``affine_grid``
    convention, align_corners=False); ``gain`` (bands,): per-band multiplicative factor;
    ``contrast`` (): factor around each band's mean; ``saturation`` (): blend factor with the
    grey image (1 = none); ``hue`` (): turn of the hue circle (RGB only, 0 = none);
    ``grayscale`` (): 1 to replace the image by its grey; ``sigma`` (): blur in output pixels,
    0 = none; ``solarize`` (): 1 to solarise.
    """
    top, left, h, w = random_resized_box(rng, height, width, spec.scale, spec.ratio)
    cx, cy = (left + w / 2) / width * 2 - 1, (top + h / 2) / height * 2 - 1
    m = np.diag(
        [-1.0 if rng.random() < aug.hflip_p else 1.0, -1.0 if rng.random() < aug.vflip_p else 1.0]
    )
    if rng.random() < aug.rot90_p:
        m = _ROTATIONS[int(rng.integers(1, 4))] @ m
    theta = np.array(
        [
            [w / width * m[0, 0], w / width * m[0, 1], cx],
            [h / height * m[1, 0], h / height * m[1, 1], cy],
        ],
        dtype=np.float32,
    )
    gain = np.ones(bands, dtype=np.float32)
    contrast, saturation, hue = np.float32(1.0), np.float32(1.0), np.float32(0.0)
    if rng.random() < aug.jitter_p:
        brightness = rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        gain = (brightness * rng.uniform(1 - aug.band_gain, 1 + aug.band_gain, size=bands)).astype(
            np.float32
        )
        contrast = np.float32(rng.uniform(1 - aug.contrast, 1 + aug.contrast))
        saturation = np.float32(rng.uniform(1 - aug.saturation, 1 + aug.saturation))
        hue = np.float32(rng.uniform(-aug.hue, aug.hue))
    grayscale = np.float32(rng.random() < aug.grayscale_p)
    sigma = np.float32(rng.uniform(*aug.blur_sigma) if rng.random() < spec.blur_p else 0.0)
    solarize = np.float32(rng.random() < spec.solarize_p)
    return {
        "theta": theta,
        "gain": gain,
        "contrast": contrast,
        "saturation": saturation,
        "hue": hue,
        "grayscale": grayscale,
        "sigma": sigma,
        "solarize": solarize,
    }


def stack_views(views: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Several views of one sample -> tensors with a leading view dimension."""
    return {k: torch.from_numpy(np.stack([v[k] for v in views])) for k in views[0]}


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(N,)`` sigmas -> ``(N, 2*radius+1)`` normalised 1-D kernels (sigma 0 -> identity)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    safe = sigma.clamp(min=1e-3).unsqueeze(1)
    k = torch.exp(-0.5 * (offsets / safe) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand_as(k)
    return torch.where((sigma > 0).unsqueeze(1), k, identity)


def blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (B, K, H, W) with one sigma per sample ``(B,)``."""
    b, k, h, w = x.shape
    radius = max(1, min(math.ceil(3 * max_sigma), (min(h, w) - 1) // 2))
    kernels = _gaussian_kernels(sigma, radius).repeat_interleave(k, dim=0)  # (B*K, 2r+1)
    flat = x.reshape(1, b * k, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
        kernels.view(b * k, 1, 1, -1),
        groups=b * k,
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="replicate"),
        kernels.view(b * k, 1, -1, 1),
        groups=b * k,
    )
    return flat.reshape(b, k, h, w)


_LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def grey(x: torch.Tensor, rgb: tuple[int, int, int] | None) -> torch.Tensor:
    """The grey image of ``x`` (B, T, C, H, W), same shape. RGB: the luma (torchvision's
    weights) in each of the three channels. Otherwise the *spectral grey*: each band's mean
    and standard deviation over the view, carrying the mean over bands of the standardised
    bands (every band shows the same spatial pattern; the spectral contrast is gone)."""
    if rgb is not None:
        luma = sum(w * x[:, :, i] for w, i in zip(_LUMA, rgb, strict=True))
        out = x.clone()
        for i in rgb:
            out[:, :, i] = luma
        return out
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    z = ((x - mean) / std).mean(dim=2, keepdim=True)
    return mean + std * z


def rotate_hue(x: torch.Tensor, hue: torch.Tensor, rgb: tuple[int, int, int]) -> torch.Tensor:
    """Turn the hue of the RGB channels by ``hue`` (B,) of a full circle: a rotation of the
    chroma plane of YIQ (luma kept), the linear counterpart of torchvision's HSV hue shift."""
    angle = 2 * math.pi * hue.float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(hue.shape[0], 3, 3, device=x.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    t = _RGB_TO_YIQ.to(x.device)
    m = torch.linalg.inv(t) @ rot @ t  # (B, 3, 3)
    idx = list(rgb)
    turned = torch.einsum("bij,btjhw->btihw", m, x[:, :, idx])
    out = x.clone()
    out[:, :, idx] = turned
    return out


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert each band above the middle of its range in the view: ``lo + hi - x`` where
    ``x >= (lo + hi) / 2`` (torchvision's ``255 - x`` above 128, for any units)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(x >= (lo + hi) / 2, lo + hi - x, x)


def render_views(
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    size: int,
    max_sigma: float = AUGMENT.blur_sigma[1],
    rgb: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Render one view per sample: ``images`` (B, T, C, H, W) canonical units, NaN = nodata;
    ``params`` as from :func:`draw_view`, batched (``theta`` (B, 2, 3), ``gain`` (B, C),
    ``contrast`` (B,), ``sigma`` (B,), optionally ``saturation``, ``hue``, ``grayscale``,
    ``solarize`` (B,)). ``rgb``: the indices of the red, green and blue bands when the image is
    RGB (torchvision's colour ops), else None (their spectral analogues, no hue). Returns
    (B, T, C, size, size), NaN where mostly nodata.
    """
    with torch.autocast(images.device.type, enabled=False):
        x = images.float()
        b, t, c, h, w = x.shape
        finite = torch.isfinite(x)
        valid = finite.all(dim=2).float()  # (B, T, H, W)
        counts = finite.sum(dim=(-2, -1)).clamp(min=1)
        mean = torch.where(finite, x, 0).sum(dim=(-2, -1)) / counts  # (B, T, C)
        filled = torch.where(finite, x, mean[..., None, None])
        theta = params["theta"].to(x.device, torch.float32)
        grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
        out = F.grid_sample(
            filled.reshape(b, t * c, h, w),
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        out_valid = (
            F.grid_sample(valid, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            > 0.5
        )  # (B, T, size, size)
        out = out.reshape(b, t, c, size, size)
        view_mean = out.mean(dim=(-2, -1), keepdim=True)
        contrast = params["contrast"].to(x.device, torch.float32).view(b, 1, 1, 1, 1)
        gain = params["gain"].to(x.device, torch.float32).view(b, 1, c, 1, 1)
        out = ((out - view_mean) * contrast + view_mean) * gain

        def per_view(key, default):
            value = params.get(key)
            if value is None:
                return torch.full((b,), default, device=x.device)
            return value.to(x.device, torch.float32).reshape(b)

        saturation = per_view("saturation", 1.0)
        if bool((saturation != 1).any()):
            g = grey(out, rgb)
            out = g + saturation.view(b, 1, 1, 1, 1) * (out - g)
        hue = per_view("hue", 0.0)
        if rgb is not None and bool((hue != 0).any()):
            out = rotate_hue(out, hue, rgb)
        gray = per_view("grayscale", 0.0) > 0
        if bool(gray.any()):
            out = torch.where(gray.view(b, 1, 1, 1, 1), grey(out, rgb), out)
        sigma = params["sigma"].to(x.device, torch.float32)
        if bool((sigma > 0).any()):
            out = blur(out.reshape(b, t * c, size, size), sigma, max_sigma).reshape(out.shape)
        solar = per_view("solarize", 0.0) > 0
        if bool(solar.any()):
            out = torch.where(solar.view(b, 1, 1, 1, 1), solarize(out), out)
        return torch.where(out_valid.unsqueeze(2), out, torch.nan)
