"""Reading source checkpoints and mapping them onto timm ViTs: pure functions on state dicts.

Layouts handled: timm (``.safetensors`` / ``.pth``), Meta's original DINOv2 ``.pth`` (with or
without registers; its ``mask_token`` is kept for iBOT), MAE checkpoints (``{"model": ...}``, with
or without the decoder, whose weights are returned separately for the MAE objective), DINOv2
training checkpoints (``teacher.backbone.*``), DDP ``module.`` prefixes and Lightning
``{"state_dict": {"model.*": ...}}`` checkpoints. timm's own
``checkpoint_filter_fn`` does the Meta -> timm key conversion and resamples the position
embedding and patch kernel to the model's grid.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from geoexplora.errors import UserError, opt

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

MAE_DECODER_PREFIX = "decoder_"


def is_weights_only_refusal(exc: pickle.UnpicklingError) -> bool:
    """torch.load(weights_only=True) met a Python object (rather than a damaged file).

    torch words it "Unsupported global: GLOBAL x.y" for a class and "unsupported GLOBAL x.y
    whose module x is blocked" for a blocked module (torch 2.6 to 2.14), so the match ignores
    case."""
    return re.search(r"unsupported\s+global", str(exc), re.IGNORECASE) is not None


def refuse_python_objects(path, exc: pickle.UnpicklingError, what: str = "") -> None:
    """The one message for a file that torch refused to unpickle: never advice to load it
    with ``weights_only=False``, which would run whatever code the file carries."""
    raise UserError(
        f"{path}: {what}holds Python objects besides tensors, which are never "
        "loaded: unpickling them can run any code; use a file of tensors only (a "
        "state dict, or .safetensors) from a source you trust"
    ) from exc


def unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """torch's own reason on one line, without its advice to load with ``weights_only=False``
    (which would run whatever code the file carries)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(exc)) if p.strip()]
    kept = [p for p in paragraphs if "weights_only" not in p and "weights only" not in p.lower()]
    return "; ".join(kept) or "unreadable pickle"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` state dict from a checkpoint file (never unpickles objects)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise UserError(f"{path}: not a readable .safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not is_weights_only_refusal(exc):
            raise UserError(
                f"{path}: not a readable PyTorch checkpoint ({unpickling_reason(exc)})"
            ) from exc
        refuse_python_objects(path, exc)
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the encoder's tensors in the usual checkpoint wrappers."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a state dict (a {type(obj).__name__})")
    for key in ("model", "state_dict", "teacher", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{path}: holds no tensors")
    # DDP's ``module.`` and a LightningModule's ``self.model``, in either nesting.
    while prefix := next(
        (p for p in ("module.", "model.") if all(k.startswith(p) for k in sd)), None
    ):
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DINOv2 training checkpoint: drop the heads
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def checkpoint_layout(sd: dict[str, torch.Tensor]) -> str:
    """``mae_with_decoder``, ``meta_dinov2`` or ``timm`` (for provenance and messages)."""
    if any(k.startswith(MAE_DECODER_PREFIX) for k in sd):
        return "mae_with_decoder"
    if "mask_token" in sd:
        return "meta_dinov2"
    return "timm"


def split_mae_decoder(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(encoder state, decoder state). The decoder state keeps MAE's key names, including its
    ``mask_token`` (decoder width), so the MAE objective can rebuild and LoRA-tune it."""
    if checkpoint_layout(sd) != "mae_with_decoder":
        return sd, {}
    decoder = {k: v for k, v in sd.items() if k.startswith(MAE_DECODER_PREFIX) or k == "mask_token"}
    encoder = {k: v for k, v in sd.items() if k not in decoder}
    return encoder, decoder


def meta_mask_token(sd: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """DINOv2's learned iBOT mask token ``(1, D)`` (timm drops it; ExPLoRA keeps it frozen)."""
    if checkpoint_layout(sd) == "meta_dinov2":
        return sd["mask_token"].reshape(1, -1).clone()
    return None


def to_timm_layout(sd: dict[str, torch.Tensor], vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm's conversion: Meta DINOv2 keys, position-embedding and patch-kernel resampling."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(sd), vit)


def load_into_vit(vit: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load a timm-layout state dict, strictly, with a message that names the source on mismatch.

    Classifier-head keys are ignored (the backbone is built without a head).
    """
    target = vit.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    wrong_shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
        for k in sorted(set(sd) & set(target))
        if sd[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
            )
        if wrong_shape:
            parts.append(f"shape {'; '.join(wrong_shape[:3])}")
        raise UserError(
            f"{source} does not fit this architecture ({'; '.join(parts)}); check "
            f"{opt('init')} names the checkpoint's architecture"
        )
    vit.load_state_dict(sd, strict=True)
