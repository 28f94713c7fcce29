"""Where a verb runs: the one place that turns what a user named (``cpu``, ``cuda``, ``cuda:1``,
``auto``, ``gpu``) into torch devices, and into Fabric's ``accelerator`` + ``devices``.

Probe and predict run on torch devices (:func:`resolve_device`, :func:`resolve_devices`); the
training verbs run under Lightning Fabric (:func:`resolve_accelerator`, :func:`fabric_target`).
Every check lives here once: an unknown name, CUDA asked for where there is none, an index past
the GPUs present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from geoexplora.errors import UserError, opt

if TYPE_CHECKING:
    import torch

Accelerator = Literal["cpu", "cuda"]


def resolve_device(name: str | None, option: str = "device") -> torch.device:
    """One torch device: ``None`` is the first GPU if there is one, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"{name}: not a device (cpu, cuda or cuda:N)", option=option) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{name}: no CUDA GPU is available on this machine", option=option)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{name}: only {torch.cuda.device_count()} GPU(s) here", option=option)
    elif device.type != "cpu":
        raise UserError(f"{name}: not a device (cpu, cuda or cuda:N)", option=option)
    return device


def resolve_devices(device: str | None, devices: str | None) -> list[torch.device]:
    """``device`` / ``devices`` -> torch devices. ``devices`` is ``N`` (the first N GPUs) or a
    list ``0,1`` / ``cuda:0,cuda:1``; without it, the one ``device``."""
    if not devices:
        return [resolve_device(device)]
    if device == "cpu":
        raise UserError(f"picks GPUs; leave it out with {opt('device')} cpu", option="devices")
    items = [d.strip() for d in devices.split(",") if d.strip()]
    if len(items) == 1 and items[0].isdigit() and not device:
        items = [f"cuda:{i}" for i in range(int(items[0]))]
    return [resolve_device(f"cuda:{d}" if d.isdigit() else d, option="devices") for d in items]


def resolve_accelerator(accelerator: str | None) -> Accelerator:
    """Fabric's accelerator: ``auto`` (or ``None``) is CUDA where there is a GPU, else the CPU."""
    import torch

    if accelerator in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"{accelerator}: no CUDA GPU is available on this machine", option="accelerator"
            )
        return "cuda"
    if accelerator == "cpu":
        return "cpu"
    raise UserError(f"must be auto, cpu or gpu, not '{accelerator}'", option="accelerator")


def fabric_target(device: str | None) -> tuple[str, int | list[int]]:
    """A torch device name as Fabric's ``(accelerator, devices)``: ``cuda:1`` is GPU 1 (not the
    first GPU), ``cuda`` the first one, ``None`` whatever ``auto`` finds."""
    if device is None:
        return "auto", 1
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return "cuda", [resolved.index] if resolved.index is not None else 1
    return "cpu", 1


def device_count(devices: int | list[int] | str) -> int:
    """How many devices a Fabric ``devices`` value names: ``2``, ``[0, 3]`` or ``"0,3"``."""
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()])
    return len(devices)
