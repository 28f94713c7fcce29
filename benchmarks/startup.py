"""`geoexplora --help` wall time vs a bare `python -c pass` (JSON line). Target: < 0.5 s."""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXE = Path(sys.executable).parent / "geoexplora"


def timed(cmd: list[str], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    bare = timed([sys.executable, "-c", "pass"])
    help_s = timed([str(EXE), "--help"])
    print(
        json.dumps(
            {
                "bench": "startup",
                "help_s": round(help_s, 3),
                "python_bare_s": round(bare, 3),
                "ratio_vs_bare": round(help_s / bare, 2),
                "target_s": 0.5,
                "ok": help_s < 0.5,
            }
        )
    )
