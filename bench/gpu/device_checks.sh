#!/usr/bin/env bash
# Every GPU check of issues 14 and 15 in one call of a lent device (about 9 minutes):
# HF synthesis on the GPU (bench/bench_synthesis.py --gpu-only; vLLM where installed), then
# the 1.8b packed bf16 step at several micro-batches with and without activation
# checkpointing, MFU and peak memory beside sweeps.memory's estimate (bench/gpu/bench_gpu.py).
# Runs from the repository root with the device's python3 (torch with CUDA, transformers).
# Writes its log to $OUT/device_checks.log where OUT is set, else to stdout only.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
LOG="${OUT:-/tmp}/device_checks.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== synthesis (hf engine on the GPU) =="
  timeout -k 5 150 "$PY" bench/bench_synthesis.py --gpu-only --threads 8
  echo "== training: 1.8b, bf16, packed FlexAttention vs naive SDPA =="
  timeout -k 10 340 "$PY" bench/gpu/bench_gpu.py --steps 3 --time-limit 320 \
    --runs "${RUNS:-packed:4,packed:16,packed:16:ckpt,packed:32:ckpt,naive:4}"
  date -u
} 2>&1 | tee "$LOG"
