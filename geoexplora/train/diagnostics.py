"""The "not learning" rule: is a run's learning signal going down at all?

Every objective logs, beside its loss, a *learning signal*: the part of its loss the model can
still reduce. For DINOv2 that is ``kl_dino`` = ``loss_dino - teacher_entropy``, the KL divergence
of the student from the teacher (the teacher's entropy alone can fall without any learning, e.g.
while its temperature warms up, and a uniform teacher sits at ``ln K`` whatever the student
does); for MAE it is ``mae_vs_baseline``, the reconstruction error over that of predicting each
image's mean masked patch. Objectives without either fall back to ``loss``.

The rule, on the JSONL records logged so far: once there are at least ``min_records``, the mean
signal over the last ``window`` records must lie at least ``min_drop`` (relative) below its mean
over the first ``window``; otherwise the run is "not learning". A run whose loss is flat because
its learning rate is zero, its inputs are identical, or its targets carry no information trips
it; a run whose student is catching up with its teacher does not.
"""

from __future__ import annotations

from geoexplora.defaults import STALL, StallDefaults

LEARNING_SIGNALS = ("kl_dino", "mae_vs_baseline", "loss")


def learning_signal(record: dict) -> str:
    """The key of the learning signal in a logged record."""
    return next(k for k in LEARNING_SIGNALS if k in record)


def stall_reason(records: list[dict], settings: StallDefaults = STALL) -> str | None:
    """Why the run is not learning (one line), or None while it learns or it is too early."""
    if len(records) < max(settings.min_records, 2 * settings.window):
        return None
    key = learning_signal(records[-1])
    values = [r[key] for r in records if key in r]
    if len(values) < max(settings.min_records, 2 * settings.window):
        return None
    start = sum(values[:settings.window]) / settings.window
    end = sum(values[-settings.window:]) / settings.window
    if end < start - settings.min_drop * abs(start):
        return None
    return (f"not learning: {key} went from {start:.4g} to {end:.4g} over steps "
            f"{records[0]['step']}-{records[-1]['step']} (a fall of at least "
            f"{settings.min_drop:.0%} is expected)")
