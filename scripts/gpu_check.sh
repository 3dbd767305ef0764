#!/usr/bin/env bash
# Run ON the lent GPU machine, in ONE call, after scripts/gpu_prepare.sh here:
#   command: "bash scripts/gpu_check.sh"   carry: ["data/multi30k", ".whl"]   timeout_s: 480
# Steps in order of value, each under its own time limit so that one hung step cannot eat the lease:
#   1. the CUDA tests (GPU_CHECK_TESTS=0 skips them);
#   2. the training levers side by side in one process (scripts/bench_levers.py): eager as configured, the
#      math and memory-efficient attention kernels, bf16 weights, torch.compile, and combinations; it writes
#      the overrides of the highest MFU to $OUT/best.txt as it goes;
#   3. `mt bench --no-decode` with those overrides: the table with the roof, MFU and the nn.Transformer ratio;
#   4. with time left and TRAIN_MINUTES given (`bash scripts/gpu_check.sh 4`), a real training run of the
#      config with the same overrides for at most that long, and its BLEU on the Multi30k test sets.
# GPU_CHECK_SET="KEY=VALUE ..." replaces the levers' winners in steps 3 and 4 (GPU_CHECK_LEVERS=0 skips step 2).
# Everything it prints is also saved under $OUT for BENCHMARKS.md.
set -uo pipefail
minutes=${1:-0}
budget=${GPU_CHECK_SECONDS:-450}  # the whole script; later steps get what is left
config=${GPU_CHECK_CONFIG:-configs/multi30k-gpu.yaml}
run=runs/$(sed -n 's/^name: *//p' "$config")
source scripts/gpu_common.sh

levers=(
  "eager:"
  "math attention: train.attention=math"
  "efficient attention: train.attention=efficient"
  "bf16 weights: train.precision=bf16-weights"
  "compiled, math, bf16 weights: train.compile=true train.attention=math train.precision=bf16-weights"
  "compiled: train.compile=true"
  "compiled, math, bf16 weights, 128k: train.compile=true train.attention=math train.precision=bf16-weights train.batch_tokens=128000"
  "compiled, bf16 weights: train.compile=true train.precision=bf16-weights"
)

{
  machine
  if [[ ${GPU_CHECK_TESTS:-1} == 1 ]]; then
    step "CUDA tests" 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py
  fi
  if [[ ${GPU_CHECK_LEVERS:-1} == 1 ]]; then
    settings=()
    for lever in "${levers[@]}"; do settings+=(--setting "$lever"); done
    step "training levers" "$(limit $((budget - 150)))" python3 scripts/bench_levers.py --config "$config" \
      --seconds 5 --best "$out/best.txt" "${settings[@]}"
  fi
  read -ra sets <<< "${GPU_CHECK_SET:-$(tr '\n' ' ' 2>/dev/null < "$out/best.txt")}"
  overrides=()
  for kv in "${sets[@]}"; do overrides+=(--set "$kv"); done
  echo "== overrides for what follows: ${sets[*]:-none}"
  step "benchmark" "$(limit 150)" python3 -m mt bench --config "$config" --seconds 8 --no-decode "${overrides[@]}"
  if ((minutes > 0 && budget - SECONDS > minutes * 60 + 90)); then
    step "training (at most $minutes min)" $((minutes * 60 + 60)) \
      python3 -m mt train --config "$config" --overwrite --set train.max_minutes="$minutes" "${overrides[@]}"
    cp "$run/metrics.jsonl" "$run/train.log" "$out/"
    step "eval" "$(limit 60)" python3 -m mt eval --run "$run" --beam 5 \
      --test multi30k:test_2016_flickr,multi30k:test_2017_flickr,multi30k:test_2017_mscoco
  elif ((minutes > 0)); then
    echo "== training: skipped, ${SECONDS} s into a budget of $budget s"
  fi
  echo "== done, ${SECONDS} s"
} 2>&1 | tee "$out/gpu_check.log"
