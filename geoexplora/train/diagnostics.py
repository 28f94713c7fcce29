"""The "not learning" rule: is a run's learning signal going down at all, and has it collapsed?

Every objective logs, beside its loss, a *learning signal*: the part of its loss the model can
still reduce. For DINOv2 that is ``kl_dino`` = ``loss_dino - teacher_entropy``, the KL divergence
of the student from the teacher (the teacher's entropy alone can fall without any learning, e.g.
while its temperature warms up, and a uniform teacher sits at ``ln K`` whatever the student
does), measured against the targets at the *final* teacher temperature (``kl_dino_ref``:
while the temperature warms up, the softening targets lower ``kl_dino`` by themselves, and a
run at a zero learning rate would look as if it learned); for MAE it is ``mae_vs_baseline``, the reconstruction error over that of predicting each
image's mean masked patch. Objectives without either fall back to ``loss``.

The rule, on the JSONL records logged so far (``w`` = ``window`` records; settings in
:data:`geoexplora.defaults.STALL`), fires on the first of:

1. **collapse** (DINOv2, from ``max(min_records, 2w)`` records): the mean
   ``prototype_max_mass`` of the last ``w`` records is at least ``collapse_mass``: one
   prototype takes most of the teacher targets' mass over the batch (every image gets the same
   target; running-mean centring can do this, Sinkhorn-Knopp balances it away);
2. **uniform student** (DINOv2, from ``max(min_records, 2w)`` records): the mean
   ``student_entropy`` of the last ``w`` records is within ``uniform_tolerance`` (relative) of
   ``ln K`` (``uniform_entropy``), and the signal over the last ``n`` records (``n`` = ``w``, or
   a quarter of the records once there are more) has not fallen below its mean over the ``n``
   before: the student outputs the uniform distribution, which scores exactly ``ln K`` against
   any balanced targets, and has stopped moving away from it;
3. **no fall** (every objective, from ``max(min_records, 2w)`` records): the mean signal over the
   last ``n`` records (``n`` = ``w``, or a quarter of the records once there are more) is not
   below its mean over the first ``n`` by at least ``min_drop`` (relative) and
   ``noise_sigmas`` standard errors of the difference of the two means (a noisy but
   stationary signal falls a little by chance).

"Falls" in rule 2 is the same test on the last two spans of ``n`` records.

A run whose loss is flat because its learning rate is zero, its inputs are identical, or its
targets carry no information trips rule 3 (and 2 where its student is uniform); a run whose
student is catching up with its teacher trips none. The engine warns once when the rule fires,
puts the reason in the summary (``stalled``, and the result's ``warnings``) and, with
``stop_if_stalled``, ends the run there (exit 1, checkpoint kept).
"""

from __future__ import annotations

from geoexplora.defaults import STALL, StallDefaults

LEARNING_SIGNALS = ("kl_dino_ref", "kl_dino", "mae_vs_baseline", "loss")


def learning_signal(record: dict) -> str:
    """The key of the learning signal in a logged record."""
    return next(k for k in LEARNING_SIGNALS if k in record)


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def _fell(before: list[float], after: list[float], settings: StallDefaults) -> bool:
    """Whether the mean of ``after`` lies below that of ``before`` by ``min_drop`` (relative)
    and by ``noise_sigmas`` standard errors of the difference of the two means."""

    def mean_var(v):
        m = sum(v) / len(v)
        return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else 0.0)

    (m0, v0), (m1, v1) = mean_var(before), mean_var(after)
    noise = (v0 / len(before) + v1 / len(after)) ** 0.5
    return m1 < m0 - max(settings.min_drop * abs(m0), settings.noise_sigmas * noise)


def _span(records: list[dict]) -> str:
    return f"steps {records[0]['step']}-{records[-1]['step']}"


def stall_reason(records: list[dict], settings: StallDefaults = STALL) -> str | None:
    """Why the run is not learning (one line), or None while it learns or it is too early."""
    w = settings.window
    enough = len(records) >= max(settings.min_records, 2 * w)
    if not enough:
        return None
    last = records[-w:]
    if all("prototype_max_mass" in r for r in last):
        mass = _mean(last, "prototype_max_mass")
        if mass >= settings.collapse_mass:
            return (
                f"not learning: collapsed, one prototype takes {mass:.0%} of the teacher targets' "
                f"mass over {_span(last)} (at least {settings.collapse_mass:.0%} counts as "
                "collapse)"
            )
    key = learning_signal(records[-1])
    n = max(w, len(records) // 4)
    recent, earlier = records[-n:], records[-2 * n : -n]
    if all(
        "student_entropy" in r and "uniform_entropy" in r and key in r for r in earlier + recent
    ):
        before, now = _mean(earlier, key), _mean(recent, key)
        entropy, uniform = _mean(last, "student_entropy"), _mean(last, "uniform_entropy")
        if entropy >= (1 - settings.uniform_tolerance) * uniform and not _fell(
            [r[key] for r in earlier], [r[key] for r in recent], settings
        ):
            return (
                f"not learning: the student's output is uniform (entropy {entropy:.4g}, "
                f"ln K = {uniform:.4g}) and {key} is not falling ({before:.4g} -> "
                f"{now:.4g} over {_span(earlier + recent)})"
            )
    values = [r[key] for r in records if key in r]
    if len(values) < max(settings.min_records, 2 * w):
        return None
    span = max(w, len(values) // 4)
    if _fell(values[:span], values[-span:], settings):
        return None
    start, end = sum(values[:span]) / span, sum(values[-span:]) / span
    return (
        f"not learning: {key} went from {start:.4g} to {end:.4g} over steps "
        f"{records[0]['step']}-{records[-1]['step']} (a fall of at least "
        f"{settings.min_drop:.0%} and {settings.noise_sigmas:g} standard errors is "
        "expected)"
    )
