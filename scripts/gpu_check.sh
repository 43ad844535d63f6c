#!/usr/bin/env bash
# Every GPU path of hilq in one run (issue: each runtime owns what it needs), at most ~8 min on
# an H100/H200: torch-cuda FP16, BF16, INT8 (torch._int_mm) and INT4 weight-only against FP16
# on resnet50 and tiny-transformer, through `hilq bench` (not a direct call); CUDA-event
# device time beside host time; NVML energy per inference over the idle baseline; integer
# kernels verified from the engine's own report. One summary table; non-zero exit on any
# failure. TensorRT is not installable on the lent machines: its runtime is checked against
# the documented API (tests/test_runtimes.py) and this script says it has not run.
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

rc=0
for model in resnet50 tiny-transformer; do
  variants=fp16,bf16,w8a8,w4a16
  echo "== $model: $variants on torch-cuda"
  timeout 240 python3 -m hilq bench --model "$model" --runtime torch-cuda \
      --variants "$variants" --rounds 2 --min-duration-s 1 --power nvml --idle-s 2 \
      --no-store --json "$out/$model.json" 2>&1 | tail -20 | tee "$out/$model.log"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "gpu_check: hilq bench $model exited $status"; rc=1; }
done

python3 scripts/gpu_summary.py "$out"/resnet50.json "$out"/tiny-transformer.json || rc=1
echo "TensorRT: not run (no TensorRT wheel on this machine); its runtime follows the documented"
echo "Python API and is exercised only by tests/test_runtimes.py's signature checks."
exit "$rc"
