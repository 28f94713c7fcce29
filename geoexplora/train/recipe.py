"""How long a training verb runs and how fast it learns: steps from epochs, the learning rate
scaled to the batch, the warm-up. Both training verbs resolve their schedule here.

The two verbs count an epoch differently, on purpose. ``adapt`` streams random crops: an epoch
is as many *images* as the data holds, so its steps are ``ceil(epochs * images / batch)``.
``finetune`` walks its chips in batches: an epoch is ``ceil(chips / batch)`` *steps* (the last,
short batch counts), and the run is a whole number of such steps.
"""

from __future__ import annotations

import math
from typing import Literal

LrScaling = Literal["sqrt", "linear"]


def global_batch(batch_size: int, accumulate: int, world_size: int) -> int:
    """Images per optimizer step, over every process and accumulated micro-batch."""
    return batch_size * accumulate * world_size


def scaled_lr(base_lr: float, base_batch: int, batch: int, scaling: LrScaling) -> float:
    """The recipe's rule for another batch size: DINOv2 scales by ``sqrt(batch / base_batch)``,
    MAE and fine-tuning linearly (``batch / base_batch``)."""
    ratio = batch / base_batch
    return base_lr * (math.sqrt(ratio) if scaling == "sqrt" else ratio)


def steps_for_images(
    steps: int | None, epochs: float | None, images: int, batch: int, default_steps: int
) -> int:
    """``adapt``'s step count: given steps, else ``epochs`` passes over ``images`` images at
    ``batch`` images a step, else ``default_steps``."""
    if steps is not None:
        return steps
    if epochs is not None:
        return max(1, math.ceil(epochs * images / batch))
    return default_steps


def steps_per_epoch(examples: int, batch: int) -> int:
    """``finetune``'s epoch: batches of ``batch`` over ``examples``, the last one short."""
    return max(1, math.ceil(examples / batch))


def steps_for_epochs(
    steps: int | None, epochs: float | None, per_epoch: int, default_epochs: float
) -> int:
    """``finetune``'s step count: given steps, else ``epochs`` (default ``default_epochs``)
    epochs of ``per_epoch`` steps, rounded to a whole step."""
    if steps is not None:
        return steps
    return max(1, round((epochs if epochs is not None else default_epochs) * per_epoch))


def warmup_from_fraction(warmup_steps: int | None, fraction: float, steps: int) -> int:
    """Given warm-up steps, else ``fraction`` of the run (``adapt``: the recipe's share)."""
    return warmup_steps if warmup_steps is not None else int(fraction * steps)


def warmup_from_epochs(
    warmup_steps: int | None, epochs: float, per_epoch: int, max_fraction: float, steps: int
) -> int:
    """Given warm-up steps, else ``epochs`` epochs, at most ``max_fraction`` of a short run
    (``finetune``: the recipe's warm-up epochs would otherwise outlast a quick run)."""
    if warmup_steps is not None:
        return warmup_steps
    return min(round(epochs * per_epoch), int(max_fraction * steps))
