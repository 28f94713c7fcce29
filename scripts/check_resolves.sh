#!/usr/bin/env bash
# Checks that geoexplora's dependency metadata resolves on the Pythons CI does not run (only
# 3.11 runs the tests), with wheels only, and that torch/torchvision stay at the tested versions.
# Usage: scripts/check_resolves.sh [PYTHON] [VERSIONS...]   (default: .venv/bin/python 3.12 3.13)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
VERSIONS=${*:-3.12 3.13}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pip refuses sdists when resolving for another Python. omegaconf (torchgeo -> lightly -> hydra)
# pins antlr4-python3-runtime==4.9.*, published as an sdist only; it is pure Python, so its
# wheel built here serves every version.
"$PY" -m pip wheel --quiet --no-deps -w "$work/wheels" 'antlr4-python3-runtime==4.9.*'
for version in $VERSIONS; do
    "$PY" -m pip install --dry-run --quiet --ignore-installed --python-version "$version" \
        --only-binary :all: --find-links "$work/wheels" --target "$work/target" \
        --report "$work/report-$version.json" .
    "$PY" - "$work/report-$version.json" "$version" <<'PYEOF'
import json
import sys

report, version = sys.argv[1], sys.argv[2]
resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.load(open(report))["install"]}
picked = {name: resolved.get(name) for name in ("torch", "torchvision", "torchgeo", "lightning",
                                                  "rasterio", "numpy")}
print(f"python {version}: " + ", ".join(f"{k} {v}" for k, v in picked.items()))
if (picked["torch"], picked["torchvision"]) != ("2.14.1", "0.29.1"):
    sys.exit(f"python {version}: torch/torchvision resolve to {picked['torch']}/"
             f"{picked['torchvision']}, not the tested 2.14.1/0.29.1")
PYEOF
done
