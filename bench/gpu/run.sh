#!/usr/bin/env bash
# GPU training-throughput benchmark, packed (FlexAttention) vs naive, with a hard limit.
# Runs from the repository root; uses $PYTHON, else .venv/bin/python, else python.
# Needs torch with CUDA and transformers (no download: random weights, synthetic data).
# Usage: bash bench/gpu/run.sh [bench_gpu.py options]   e.g. --steps 6 --batch 64
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# hard limit: 4 minutes overall (the script itself stops between steps at 210 s)
exec timeout -k 10 240 "$PY" bench/gpu/bench_gpu.py "$@"
