"""Date encoding for temporal stacks: T dates -> T token sets with a zero-gated date signal.

Each frame's tokens get ``gate * proj(features(date))`` added, where the features are sin/cos of
the day of year (annual harmonics) and of the days since the sample's first valid date (at a
few periods). The gate starts at zero, so at step 0 every frame is embedded exactly as the source
model embeds a single image; training opens the gate. Dates travel as float days since
1970-01-01 (NaN = unknown: that frame gets no date signal).
"""

from __future__ import annotations

import datetime as dt
import math

import torch
from torch import nn

EPOCH = dt.date(1970, 1, 1)
TROPICAL_YEAR_DAYS = 365.2425
ANNUAL_HARMONICS = 2
ELAPSED_PERIODS_DAYS = (16.0, 64.0, 256.0, 1024.0)


def days_since_epoch(dates: list[str | None]) -> list[float]:
    """ISO dates (``YYYY-MM-DD``, optionally with a time) -> days since 1970-01-01, NaN for None."""
    out = []
    for d in dates:
        if d is None or d == "":
            out.append(math.nan)
        else:
            out.append(float((dt.date.fromisoformat(str(d)[:10]) - EPOCH).days))
    return out


def date_features(days: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` days -> ``(B, T, F)`` features; zero where the date is unknown.

    Day of year uses the mean tropical year, which is within a day of the calendar: ample for an
    annual cycle.
    """
    valid = torch.isfinite(days)
    d = torch.where(valid, days, torch.zeros_like(days)).float()
    first = torch.where(valid, d, torch.full_like(d, math.inf)).amin(dim=1, keepdim=True)
    first = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    elapsed = (d - first).clamp_min(0)
    phase = 2 * math.pi * torch.remainder(d, TROPICAL_YEAR_DAYS) / TROPICAL_YEAR_DAYS
    feats = []
    for k in range(1, ANNUAL_HARMONICS + 1):
        feats += [torch.sin(k * phase), torch.cos(k * phase)]
    for period in ELAPSED_PERIODS_DAYS:
        angle = 2 * math.pi * elapsed / period
        feats += [torch.sin(angle), torch.cos(angle)]
    out = torch.stack(feats, dim=-1)
    return out * valid.unsqueeze(-1).to(out.dtype)


NUM_DATE_FEATURES = 2 * ANNUAL_HARMONICS + 2 * len(ELAPSED_PERIODS_DAYS)


class DateEncoding(nn.Module):
    """``(B, T)`` days -> ``(B, T, D)`` additive encodings, zero at initialisation (gate = 0)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(NUM_DATE_FEATURES, embed_dim)
        self.gate = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        feats = date_features(days).to(self.proj.weight.dtype)
        known = torch.isfinite(days).unsqueeze(-1).to(feats.dtype)
        return self.proj(feats) * self.gate * known
