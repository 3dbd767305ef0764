#!/usr/bin/env bash
# Run ON the lent GPU machine, in ONE call, after scripts/gpu_prepare.sh here:
#   command: "bash scripts/gpu_check.sh"   carry: ["data/multi30k", ".whl"]   timeout_s: 510
# Steps in order of value, each under its own time limit so that one hung step cannot eat the lease:
#   1. the CUDA tests (GPU_CHECK_TESTS=0 skips them);
#   2. the training levers side by side in one process (scripts/bench_levers.py): eager as configured,
#      compiled, the eager levers combined and alone; it writes the overrides of the highest MFU to
#      $OUT/best.txt as it goes (GPU_CHECK_LEVERS=0 skips it);
#   3. `mt bench --no-decode` with those overrides: the table with the roof, MFU and the nn.Transformer ratio
#      (GPU_CHECK_BENCH=0 skips it);
#   4. given TRAIN_MINUTES (`bash scripts/gpu_check.sh 5`) and the time, a real training run of the config with
#      the same overrides, batch size excepted (the recipe's learning rate and warm-up go with 64k tokens), for
#      at most that long, and its BLEU on the Multi30k test sets. The levers leave no time for it: the quality
#      run alone is `GPU_CHECK_TESTS=0 GPU_CHECK_LEVERS=0 GPU_CHECK_BENCH=0 GPU_CHECK_SECONDS=570
#      bash scripts/gpu_check.sh 5` (timeout_s 600), with GPU_CHECK_SET for the overrides.
# GPU_CHECK_SET="KEY=VALUE ..." (empty: none) replaces the levers' winners in steps 3 and 4.
# Everything it prints is also saved under $OUT for BENCHMARKS.md.
set -uo pipefail
minutes=${1:-0}
whole_minutes=${minutes%.*}  # rounded up: bash counts in integers; train.max_minutes takes the number as given
[[ $minutes == *.* ]] && ((whole_minutes++))
train_limit=$((whole_minutes * 60 + 150))  # data preparation, and averaging and tuning at the end
budget=${GPU_CHECK_SECONDS:-480}  # the whole script; later steps get what is left
config=${GPU_CHECK_CONFIG:-configs/multi30k-gpu.yaml}
run=runs/$(sed -n 's/^name: *//p' "$config")
source scripts/gpu_common.sh
rm -f "$out/best.txt"  # never a winner of an earlier run

# Eager as configured first, then the compiled setting most likely to win: on the lent H100 (torch 2.11,
# BENCHMARKS.md, `c6f9b9b`) compiling the whole model took over 390 s and never finished inside the budget;
# train.compile now compiles layer by layer (257 s down to 100 s on 2 CPU cores). The eager levers follow.
levers=(
  "eager:"
  "compiled, math, bf16 weights: train.compile=true train.attention=math train.precision=bf16-weights"
  "math, bf16 weights: train.attention=math train.precision=bf16-weights"
  "bf16 weights: train.precision=bf16-weights"
  "math attention: train.attention=math"
  "efficient attention: train.attention=efficient"
  "math, bf16 weights, 128k: train.attention=math train.precision=bf16-weights train.batch_tokens=128000"
  "compiled: train.compile=true"
)

{
  machine
  if [[ ${GPU_CHECK_TESTS:-1} == 1 ]]; then
    step "CUDA tests" "$(limit 90)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py
  fi
  if [[ ${GPU_CHECK_LEVERS:-1} == 1 ]]; then
    settings=()
    for lever in "${levers[@]}"; do settings+=(--setting "$lever"); done
    # Leaves 150 s for the benchmark. No new setting starts after `--budget`; an eager one started before it
    # takes under 30 s, then the first one runs again (under 30 s), and starting python and torch takes some
    # 20 s: 140 s of margin. A compiled setting may outlast it (the whole model took over 390 s to compile on the
    # H100): the step's time limit then stops it, and the rows printed before it stand. TORCH_LOGS names any
    # recompilation.
    levers_limit=$(limit $((budget - 150 - SECONDS)))
    if ((levers_limit >= 180)); then
      TORCH_LOGS=recompiles step "training levers" "$levers_limit" python3 scripts/bench_levers.py \
        --config "$config" --seconds 5 --budget $((levers_limit - 140)) --best "$out/best.txt" "${settings[@]}"
    else
      echo "== training levers: skipped, ${levers_limit} s left for them"
    fi
  fi
  read -ra sets <<< "${GPU_CHECK_SET-$(tr '\n' ' ' 2>/dev/null < "$out/best.txt")}"
  overrides=() training=()
  for kv in "${sets[@]}"; do
    overrides+=(--set "$kv")
    [[ $kv == train.batch_tokens=* ]] || training+=(--set "$kv")
  done
  echo "== overrides for what follows: ${sets[*]:-none}"
  if [[ ${GPU_CHECK_BENCH:-1} == 1 ]]; then
    step "benchmark" "$(limit 150)" python3 -m mt bench --config "$config" --seconds 8 --no-decode "${overrides[@]}"
  fi
  if ((whole_minutes > 0 && budget - SECONDS > train_limit + 40)); then
    step "training (at most $minutes min)" "$train_limit" \
      python3 -m mt train --config "$config" --overwrite --set train.max_minutes="$minutes" "${training[@]}"
    cp "$run/metrics.jsonl" "$run/train.log" "$out/"
    step "eval" "$(limit 60)" python3 -m mt eval --run "$run" --beam 5 \
      --test multi30k:test_2016_flickr,multi30k:test_2017_flickr,multi30k:test_2017_mscoco
  elif [[ $minutes != 0 ]]; then
    echo "== training: skipped, ${SECONDS} s into a budget of $budget s"
  fi
  echo "== done, ${SECONDS} s"
} 2>&1 | tee "$out/gpu_check.log"
