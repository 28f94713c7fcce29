#!/usr/bin/env bash
# GPU check, in one go (< 8 min on one H200): installs geoexplora from this source tree with the
# carried wheels, then benchmarks/gpu_bench.py prints JSON lines:
#   adapt images/s, peak memory and model-FLOP utilisation for ViT-B/14 and ViT-L/14 (DINOv2
#   objective, bf16, 224 px), ExPLoRA vs full-parameter (target: ViT-L/14 ExPLoRA >= 35 % MFU),
#   and ExPLoRA at --preset paper's micro-batch (8 per GPU); adapt() end to end vs its step
#   alone; the learning diagnostics (loss terms, teacher/student entropy, kl_dino, view
#   agreement, prototype mass, per-group grad norms, stall verdict) of the first 300 steps of a
#   ViT-B/14 on real Sentinel-2 L2A scenes; predict megapixels/s for ViT-B/14; a 2-step DDP run
#   when there is more than one GPU. Record the lines in docs/benchmarks.md.
#
# The real scenes of the diagnostics run travel in .bench-data/ (ignored, like .whl/):
#   mkdir -p .bench-data && cp ../shared/data/s2-l2a-29RKH-2020-02-19/*_12band_200m.tif \
#     .bench-data/ && echo /.bench-data/ >> .git/info/exclude
# (with the bundled 256 px crop of the same tile that makes two scenes; --target A.tif,B.tif
# names others). Then carry [".whl", ".bench-data"].
#
# Usage:
#   bash benchmarks/gpu.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run    # here, on CPU: tiny configurations, no install
#   GEOEXPLORA_GPU_DRY_RUN=1 bash benchmarks/gpu.sh   # the same
#   extra arguments go to gpu_bench.py (e.g. --skip e2e,predict, --peak-tflops 989,
#   --target a.tif,b.tif)
#
# The GPU machine (see /work/.library/device/README.md): python3 3.12 with torch, timm, peft,
# lightning, typer, rich, xarray, pyarrow, matplotlib, safetensors, requests; no network. The
# rest of geoexplora's dependencies travel as wheels in .whl/ (kept out of git by
# `echo /.whl/ >> .git/info/exclude`), fetched beforehand on a machine with network:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     rasterio==1.4.4 pyproj==3.7.2 shapely==2.2.0 pyogrio==0.13.0
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#     affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2 rioxarray==0.19.0 geopandas==1.2.0
#
# (torchgeo is needed only for --init torchgeo:... sources, which this check does not use.
# Versions as in this project's venv: `.venv/bin/pip freeze | grep -i NAME`; pure-Python ones
# are fetched without --platform; `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`
# lists each one's needs; one `python3 -m pip show` there tells which are already present; keep
# one version of each.) Then run, with the device tool:
#   carry [".whl", ".bench-data"], command: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${GEOEXPLORA_GPU_DRY_RUN:-0}"
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

if [[ "$DRY_RUN" == "1" ]]; then
  PY="${PYTHON:-.venv/bin/python}"
  [[ -x "$PY" ]] || PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # The dry run checks the script on a CPU, often a shared one: one thread avoids
  # oversubscription stalls; the numbers mean nothing.
  export OMP_NUM_THREADS=1
  exec timeout 300 "$PY" -W ignore benchmarks/gpu_bench.py --dry-run "${ARGS[@]+"${ARGS[@]}"}"
fi

PY="${PYTHON:-python3}"
START=$(date +%s)
SITE=/tmp/geoexplora-site
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
fi
# The source tree itself on the path (no build step, no network); the console script is not
# needed: gpu_bench.py calls the library, and its DDP check runs a one-line launcher.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import geoexplora.cli, rasterio, rioxarray, geopandas, timm, peft, lightning" || {
  echo "gpu.sh: geoexplora's dependencies are incomplete; carry the wheels listed in this" \
       "script's header in .whl/" >&2
  exit 2
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
export PYTHONUNBUFFERED=1
# 8 minutes in all, the install included.
LEFT=$(( 480 - ($(date +%s) - START) ))
timeout "$LEFT" "$PY" -W ignore benchmarks/gpu_bench.py "${ARGS[@]+"${ARGS[@]}"}"
