#!/usr/bin/env bash
# The GPU benchmark in one command, from the repository root: `bash bench/gpu.sh [bench/gpu.py options]`.
# Needs only python3 with torch, torchvision, Pillow, numpy and pandas (Ray optional); finishes within 5 minutes.
# Figures go to stdout and, when OUT is set, to $OUT/gpu_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
# gpu.py plans for 270 s itself; the hard stop at 290 s (then SIGKILL 10 s later) keeps the whole under 5 minutes.
exec timeout --kill-after=10 290 "$PYTHON" bench/gpu.py --budget 270 "$@"
