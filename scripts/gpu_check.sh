#!/usr/bin/env bash
# The lent GPU machine's one script: its GPU's facts, then `hilq devices gpu` (every GPU path
# of hilq in one run, at most ~8 min on an H100/H200: torch-cuda FP16, BF16, INT8 and INT4
# weight-only against FP16 on resnet50 and tiny-transformer; CUDA-event device time, NVML
# energy, integer kernels; one table, non-zero exit on any failure; TensorRT said not run).
#
#     bash scripts/gpu_check.sh [OUT_DIR]        (OUT_DIR default: $OUT or .cache/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.cache/gpu-check}}"
mkdir -p "$out"
export HILQ_CACHE="${HILQ_CACHE:-$out/cache}"

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: no CUDA device visible to torch here; nothing to prove"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# hilq from this checkout (the lent machines reach no package index: what hilq imports must
# already be there; the first failing import is printed and the check fails)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import hilq.bench.cli, hilq.quant.export, hilq.devices.runtimes.torch_cuda" || {
  echo "gpu_check: hilq's dependencies are missing here (pip install -e .)"; exit 3; }

# every GPU path, judged row by row (bench/gpu_check.py); exit 1 on any failure
python3 -m hilq devices gpu --json "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
