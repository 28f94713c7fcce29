"""Checks of numeric options that several verbs share, so each says the same thing.

An option left out is ``None`` and takes its default through :func:`given_or`; a value given is
kept as it is, so ``--steps 0`` is refused instead of silently becoming the default (which
``value or default`` would do).
"""

from __future__ import annotations

from geoexplora.errors import UserError


def given_or(value, default):
    """``value`` unless the option was left out (None): 0 and negatives are kept, for the
    checks to refuse."""
    return default if value is None else value


def require_at_least(option: str, value, minimum: int = 1) -> None:
    """Refuse ``value < minimum`` (None: the option was left out, nothing to check)."""
    if value is not None and value < minimum:
        raise UserError(f"{option} must be at least {minimum}, not {value}")


def require_positive(option: str, value) -> None:
    """Refuse zero, negatives and NaN (None: left out)."""
    if value is not None and not value > 0:
        raise UserError(f"{option} must be positive, not {value}")
