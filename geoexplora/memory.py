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


def check_fits(planned_bytes: int, what: str, hint: str) -> None:
    """Refuse a plan of ``planned_bytes`` above ``MEMORY.usable_fraction`` of the available
    memory; ``what`` names the plan, ``hint`` the option(s) that make it smaller."""
    available = available_bytes()
    if available is None:
        return
    if planned_bytes > MEMORY.usable_fraction * available:
        raise UserError(f"{what} needs about {gib(planned_bytes)} of memory; this machine has "
                        f"{gib(available)} available; {hint}")
