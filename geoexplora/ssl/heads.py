"""The DINO/iBOT projection head (DINOv2's ``DINOHead``): MLP -> L2-normalised bottleneck ->
weight-normalised prototypes (weight norm with the gain fixed to 1, as in DINOv2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DinoHead(nn.Module):
    """``(N, in_dim)`` -> ``(N, prototypes)`` logits in [-1, 1] (cosine similarities)."""

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3):
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
        # The prototypes ("last layer"): their rows are normalised in forward (weight norm, g=1).
        self.last_layer = nn.Linear(bottleneck, prototypes, bias=False)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))
