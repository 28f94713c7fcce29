"""The memory guard: a run's planned memory checked against what the machine has available,
before anything of the plan is allocated. A plan that cannot fit is refused with its estimate and
the option that sizes it, instead of swapping for hours or being killed by the OOM killer."""

from __future__ import annotations

from pathlib import Path

from geoexplora.defaults import MEMORY
from geoexplora.errors import UserError

MEMINFO = Path("/proc/meminfo")


def available_bytes() -> int | None:
    """Memory available to a new allocation without swapping (Linux ``MemAvailable``), or None
    where the system does not say (the guard then does not refuse anything)."""
    try:
        text = MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def device_available_bytes(device) -> tuple[int | None, str]:
    """(bytes free for a new allocation on ``device``, how to name it in a message): a GPU's
    free memory as CUDA reports it, else the machine's available memory."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], str(device)
    return available_bytes(), "this machine"


def check_fits(planned_bytes: int, what: str, hint: str, device=None) -> None:
    """Refuse a plan of ``planned_bytes`` above ``MEMORY.usable_fraction`` of the memory
    available on ``device`` (None: the machine's); ``what`` names the plan, ``hint`` the
    option(s) that make it smaller."""
    available, where = device_available_bytes(device)
    if available is None:
        return
    if planned_bytes > MEMORY.usable_fraction * available:
        raise UserError(
            f"{what} needs about {gib(planned_bytes)} of memory; {where} has "
            f"{gib(available)} available; {hint}"
        )


# --- training and feature extraction: what a step of a ViT holds ------------------------------


def vit_tokens(backbone, size: int) -> int:
    """Tokens of one ``size`` x ``size`` px sample through a GeoViT's blocks (prefix tokens and
    the patches of every frame and band group)."""
    h, w = backbone.grid_size(size, size)
    return backbone.num_prefix_tokens + backbone.num_groups * backbone.num_frames * h * w


def activation_bytes(
    backbone, batch_size: int, tokens: int, bytes_per_value: int, backward: bool
) -> int:
    """Activations of ``batch_size`` samples of ``tokens`` tokens: Korthikanti et al. (2022)'s
    34 * D bytes per token per block in 16-bit (attention with a fused kernel), scaled to
    ``bytes_per_value``. Kept for every block when gradients flow back through them, else one
    block's at a time (a frozen backbone, feature extraction). A guide, +-50 %."""
    per_block = batch_size * tokens * 34 * backbone.embed_dim * bytes_per_value // 2
    return per_block * (backbone.depth if backward else 1)


def batches_in_flight(num_workers: int, prefetch_factor: int) -> int:
    """Input batches alive at once: each worker's prefetched ones and the one in use."""
    return num_workers * prefetch_factor + 1 if num_workers > 0 else 1


def training_estimate(
    module,
    backbone,
    batch_size: int,
    sample_bytes: int,
    tokens: int,
    precision: str,
    loader_batches: int,
) -> dict:
    """Bytes one training process holds: the weights, gradients and AdamW state of the trainable
    parameters, the activations of a step, and the input batches in flight."""
    params = {id(p): p for p in module.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    backward = any(p.requires_grad for p in backbone.vit.blocks.parameters())
    parts = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer_state": trainable * 8,
        "activations": activation_bytes(
            backbone, batch_size, tokens, 2 if "16" in str(precision) else 4, backward
        ),
        "input_batches": loader_batches * batch_size * sample_bytes,
    }
    return {**{f"{k}_bytes": v for k, v in parts.items()}, "total_bytes": sum(parts.values())}


def check_training_fits(estimate: dict, device, what: str, hint: str) -> None:
    """Refuse a training plan (:func:`training_estimate`) that cannot fit: on a GPU the model's
    part against the GPU's free memory and the input batches against the machine's, else the
    whole against the machine's."""
    total, inputs = estimate["total_bytes"], estimate["input_batches_bytes"]
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        check_fits(total - inputs, what, hint, device)
        check_fits(inputs, what, hint)
    else:
        check_fits(total, what, hint)


def sample_bytes(item: dict) -> int:
    """Bytes of one dataset item (its tensors and arrays), as a batch holds it."""
    return sum(int(v.nbytes) for v in item.values() if hasattr(v, "nbytes"))


def check_training_memory(
    module, backbone, sample: dict, size: int, batch_size: int, fabric, num_workers: int | None
) -> dict:
    """Refuse, before its first batch is drawn, a training run whose step cannot fit: ``module``
    is what trains (its trainable parameters set), ``sample`` one dataset item of ``size`` px.
    Returns the estimate."""
    from geoexplora.defaults import ENGINE
    from geoexplora.errors import opt
    from geoexplora.train.engine import resolve_num_workers

    precision = str(getattr(fabric.strategy.precision, "precision", ""))
    estimate = training_estimate(
        module,
        backbone,
        batch_size,
        sample_bytes(sample),
        vit_tokens(backbone, size),
        precision,
        batches_in_flight(resolve_num_workers(num_workers), ENGINE.prefetch_factor),
    )
    check_training_fits(
        estimate,
        fabric.device,
        f"training {size} px chips with {opt('batch_size')} {batch_size}",
        f"use a smaller {opt('batch_size')} ({opt('accumulate')} keeps the global batch)",
    )
    return estimate


def check_extraction_memory(
    backbone, sample: dict, size: int, batch_size: int, device, num_workers: int
) -> dict:
    """Refuse feature extraction (a frozen backbone, no gradients) whose batch cannot fit: the
    weights, one block's activations and the input batches in flight. Returns the estimate."""
    from geoexplora.errors import opt

    weights = sum(p.numel() * p.element_size() for p in backbone.parameters())
    activations = activation_bytes(
        backbone, batch_size, vit_tokens(backbone, size), 4, backward=False
    )
    inputs = (
        batches_in_flight(num_workers, 2)  # a plain DataLoader: prefetch_factor 2
        * batch_size
        * sample_bytes(sample)
    )
    what = f"extracting features of {size} px chips with {opt('extract_batch_size')} {batch_size}"
    hint = f"use a smaller {opt('extract_batch_size')}"
    estimate = {
        "weights_bytes": weights,
        "activations_bytes": activations,
        "input_batches_bytes": inputs,
        "total_bytes": weights + activations + inputs,
    }
    check_training_fits(estimate, device, what, hint)
    return estimate
