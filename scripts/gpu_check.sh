#!/usr/bin/env bash
# One CUDA GPU, about 6 minutes: what lmp has run only on CPU so far (flash and variable-length
# attention, compile on CUDA, lmp vs transformers compiled at 125M, a 200-step run and its resume).
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [OUT_DIR]      (in an environment with lmp's dependencies and CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --out "${1:-gpu-check}"
