#!/usr/bin/env bash
# Run ON the lent GPU machine, as the first of two calls in a lease, after scripts/gpu_prepare.sh here:
#   command: "bash scripts/gpu_levers.sh"   carry: ["data/multi30k", ".whl"]   timeout_s: 450
# Measures the training levers that have not run on a GPU yet, side by side with the eager baseline in this one
# call, on configs/multi30k-gpu.yaml (`mt bench --no-decode`): torch.compile (`train.compile`), bf16 weights
# with fp32 master weights against bf16 autocast (`train.precision: bf16-weights`, scripts/bench_precision.py),
# 128k-token batches, both together, and the attention kernels: memory-efficient tried before flash, and the
# math kernel alone (scripts/sdpa_backends.py). The second call then runs scripts/gpu_check.sh with the winners, e.g.
# GPU_CHECK_SET="train.compile=true". Steps come in order of value; the last get what is left of the budget.
set -uo pipefail
budget=${GPU_CHECK_SECONDS:-420}
config=${GPU_CHECK_CONFIG:-configs/multi30k-gpu.yaml}
source scripts/gpu_common.sh

bench() {  # bench "KEY=VALUE ...": the training benchmark with those overrides
  local overrides=() sets kv
  read -ra sets <<< "$1"
  for kv in "${sets[@]}"; do overrides+=(--set "$kv"); done
  step "training benchmark, ${1:-eager, 64k-token batches}" "$(limit 200)" \
    python3 -m mt bench --config "$config" --seconds 8 --no-decode "${overrides[@]}"
}

{
  machine
  step "CUDA tests" 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
  bench ""
  bench "train.compile=true"
  step "precision" "$(limit 120)" python3 scripts/bench_precision.py --config "$config" --seconds 6 --rounds 2
  step "attention kernels" "$(limit 120)" python3 scripts/sdpa_backends.py --config "$config" --seconds 6 --rounds 1 \
    --no-decode
  bench "train.batch_tokens=128000"
  bench "train.batch_tokens=128000 train.compile=true"
  echo "== done, ${SECONDS} s"
} 2>&1 | tee "$out/gpu_levers.log"
