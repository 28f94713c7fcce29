"""Task heads on a GeoViT: classification, multilabel, segmentation.

Classification and multilabel share a linear head on pooled features (cls token, the cls tokens
of the last 4 blocks, mean of patch tokens, or cls and mean together); multilabel logits go through a sigmoid at use. Segmentation uses a light
decoder on the last block's patch tokens: 1x1 projection, bilinear upsampling to the input size,
a 3x3 refinement conv (replicate padding: no zero-padding artefacts along window and raster
edges), 1x1 classifier. For temporal stacks (T > 1) the patch tokens of the valid
frames are averaged before decoding: the head then does not depend on T, missing frames simply
drop out, and the temporal mixing happens where it should, in attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoexplora.errors import UserError
from geoexplora.models.geovit import GeoViT

TASKS = ("classification", "multilabel", "segmentation")
POOLINGS = ("cls", "mean", "cls+mean", "cls4", "cls4+mean")
CLS_BLOCKS = 4  # "cls4": class tokens of the last 4 blocks (DINOv2 linear-probe protocol)


def pool_frames(patch: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, N, D)`` -> ``(B, N, D)``: mean over valid frames (all frames without a mask)."""
    if frame_mask is None:
        return patch.mean(dim=1)
    weight = frame_mask.to(patch.dtype)[:, :, None, None]
    return (patch * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


class LinearHead(nn.Module):
    """Linear classifier on pooled features (classification, multilabel)."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        pooling: str = "mean",
        init_std: float = 2e-5,
        cls_blocks: int = CLS_BLOCKS,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.cls_blocks = cls_blocks if pooling.startswith("cls4") else 0
        in_dim = embed_dim * (
            max(1, self.cls_blocks) * pooling.startswith("cls") + pooling.endswith("mean")
        )
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)
        self.config: dict[str, str | int] = {
            "type": "linear",
            "pooling": pooling,
            "num_classes": num_classes,
        }
        if self.cls_blocks:
            self.config["cls_blocks"] = self.cls_blocks

    def forward(
        self, features: dict, frame_mask: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        parts = []
        if self.cls_blocks:
            parts.append(features["cls_blocks"])
        elif self.pooling.startswith("cls"):
            parts.append(features["cls"])
        if self.pooling.endswith("mean"):
            parts.append(pool_frames(features["patch"], frame_mask).mean(dim=1))
        return self.fc(torch.cat(parts, dim=-1))


class SegmentationHead(nn.Module):
    """Light decoder: patch tokens ``(B, N, D)`` on an ``h x w`` grid -> logits ``(B, K, H, W)``."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, hidden, kernel_size=1)
        self.refine = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, padding_mode="replicate"),
            nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden),
            nn.GELU(),
        )
        self.classify = nn.Conv2d(hidden, num_classes, kernel_size=1)
        self.config: dict[str, str | int] = {
            "type": "segmentation",
            "hidden": hidden,
            "num_classes": num_classes,
        }

    def forward(
        self,
        features: dict,
        frame_mask: torch.Tensor | None,
        size: tuple[int, int],
        grid: tuple[int, int],
    ) -> torch.Tensor:
        tokens = pool_frames(features["patch"], frame_mask)  # (B, N, D)
        b, _, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *grid)
        x = F.gelu(self.proj(x))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classify(self.refine(x))


def build_head(
    task: str, embed_dim: int, num_classes: int, **config
) -> LinearHead | SegmentationHead:
    """A head for ``task``; ``config`` as stored in a model file (``type`` is implied)."""
    config = {k: v for k, v in config.items() if k not in ("type", "num_classes")}
    if task in ("classification", "multilabel"):
        return LinearHead(embed_dim, num_classes, **config)
    if task == "segmentation":
        return SegmentationHead(embed_dim, num_classes, **config)
    raise UserError(f"task {task!r}: use one of {', '.join(TASKS)}")


class TaskModel(nn.Module):
    """A backbone with a task head. ``classes``: ``[{"id", "name", "color"}]``."""

    meta: dict  # the model file's metadata, set by ``load_model``

    def __init__(
        self, backbone: GeoViT, head: LinearHead | SegmentationHead, task: str, classes: list[dict]
    ):
        super().__init__()
        if task not in TASKS:
            raise UserError(f"task {task!r}: use one of {', '.join(TASKS)}")
        if len(classes) != head.config["num_classes"]:
            raise UserError(
                f"{len(classes)} classes but the head predicts {head.config['num_classes']}"
            )
        self.backbone = backbone
        self.head = head
        self.task = task
        self.classes = [dict(c) for c in classes]

    @property
    def config(self) -> dict:
        return {"task": self.task, "classes": self.classes, "head": dict(self.head.config)}

    def forward(
        self,
        x: torch.Tensor,
        dates: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K)`` (classification, multilabel) or ``(B, K, H, W)`` (segmentation)."""
        cls_blocks = getattr(self.head, "cls_blocks", 0)
        features = self.backbone.forward_features(
            x, dates=dates, frame_mask=frame_mask, cls_blocks=cls_blocks
        )
        size = tuple(x.shape[-2:])
        if self.task == "segmentation":
            return self.head(features, frame_mask, size, self.backbone.grid_size(*size))
        return self.head(features, frame_mask, size)
