"""The DINO/iBOT projection head (DINOv2's ``DINOHead``): MLP -> L2-normalised bottleneck ->
weight-normalised prototypes, ``weight = g * v / ||v||`` per prototype
(:func:`torch.nn.utils.parametrizations.weight_norm`), the gain ``g`` initialised to 1 and
trained, as in DINOv2 (``trainable_gain=False`` fixes it at 1, as DINO v1's
``norm_last_layer``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DinoHead(nn.Module):
    """``(N, in_dim)`` -> ``(N, prototypes)`` logits: cosine similarities times each
    prototype's gain ``g`` (1 at initialisation)."""

    def __init__(
        self,
        in_dim: int,
        prototypes: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        layers: int = 3,
        trainable_gain: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # The prototypes ("last layer"): direction v, gain g (DINOv2: weight_norm, g filled 1).
        last = nn.Linear(bottleneck, prototypes, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last)
        with torch.no_grad():
            self.gain.fill_(1.0)
        self.gain.requires_grad_(trainable_gain)

    @property
    def gain(self) -> nn.Parameter:
        """The prototypes' gains ``g`` (``(prototypes, 1)``)."""
        return self.last_layer.parametrizations.weight.original0

    @property
    def direction(self) -> nn.Parameter:
        """The prototypes' un-normalised directions ``v`` (``(prototypes, bottleneck)``)."""
        return self.last_layer.parametrizations.weight.original1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
