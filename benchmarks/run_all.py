"""Runs every benchmark script (`make bench`); each prints JSON lines on stdout.

Pass names to run a subset: python benchmarks/run_all.py startup tile
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["startup", "tile", "adapt_step", "predict", "domain_shift"]

if __name__ == "__main__":
    names = sys.argv[1:] or ORDER
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        print(f"# {name}", file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, str(script)], check=False).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
