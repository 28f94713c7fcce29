"""What the engine needs from a geoexplora model file: forwards per device, and what they return.

A :class:`Predictor` wraps a loaded model (``TaskModel`` or backbone) as plain callables
``(B, T, C, H, W) canonical units -> (B, K, h, w) | (B, K)``: class probabilities (softmax, or
sigmoid for multilabel) or patch embeddings. Frames with no valid pixel in a window are masked
out of attention (``frame_mask``), and the scene's dates feed the date encoding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from geoexplora.errors import UserError


@dataclass
class Predictor:
    task: str  # segmentation | classification | multilabel | embedding
    channels: int
    patch_size: int
    window: int  # the model's image size: the default window
    classes: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    make_forward: Callable | None = None  # (torch.device) -> forward
    num_frames: int = 1

    @property
    def per_window(self) -> bool:
        """True when the model returns one value per window (classification)."""
        return self.task in ("classification", "multilabel")


def _frame_mask(x):
    import torch

    return torch.isfinite(x).all(dim=2).flatten(2).any(dim=-1)


def predictor_from_model(model, days: list[float], embed: bool = False, pca=None) -> Predictor:
    """A Predictor for a loaded model. ``days``: the frames' dates (days since 1970) for
    multi-date models. ``embed``: patch embeddings of the backbone, projected by ``pca`` (a
    ``(mean (D,), components (K, D))`` pair of tensors) when given."""
    import torch

    from geoexplora.models.heads import TaskModel, pool_frames

    meta = model.meta
    backbone = model.backbone if isinstance(model, TaskModel) else model
    arch = meta["backbone"]["architecture"]
    patch, window = int(arch["patch_size"]), int(arch["img_size"][0])
    frames = int(meta["backbone"]["num_frames"])
    if not embed and not isinstance(model, TaskModel):
        raise UserError(
            "the model file holds a backbone without a task head: use "
            "`geoexplora embed` for its embeddings, or fine-tune it first"
        )
    task = "embedding" if embed else model.task
    channels = (
        (pca[1].shape[0] if pca is not None else backbone.embed_dim)
        if embed
        else len(model.classes)
    )
    replicas: dict = {}

    def make_forward(device):
        key = str(device)
        if key not in replicas:
            replicas[key] = model if not replicas else copy.deepcopy(model)
            replicas[key].to(device).eval()
        net = replicas[key]
        bb = net.backbone if isinstance(net, TaskModel) else net
        dates = torch.tensor([days], dtype=torch.float32, device=device) if frames > 1 else None
        proj = tuple(t.to(device) for t in pca) if pca is not None else None

        def forward(x):
            b = x.shape[0]
            d = dates.expand(b, -1) if dates is not None else None
            mask = _frame_mask(x) if frames > 1 else None
            if embed:
                feats = bb.forward_features(x, dates=d, frame_mask=mask)
                tokens = pool_frames(feats["patch"], mask)  # (B, N, D)
                if proj is not None:
                    tokens = (tokens - proj[0]) @ proj[1].T
                h, w = bb.grid_size(x.shape[-2], x.shape[-1])
                return tokens.transpose(1, 2).reshape(b, -1, h, w)
            logits = net(x, dates=d, frame_mask=mask)
            if task == "multilabel":
                return torch.sigmoid(logits.float())
            return torch.softmax(logits.float(), dim=1)

        return forward

    return Predictor(
        task,
        channels,
        patch,
        window,
        classes=[] if embed else [dict(c) for c in model.classes],
        meta=meta,
        make_forward=make_forward,
        num_frames=frames,
    )
