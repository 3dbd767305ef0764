#!/usr/bin/env bash
# Run ON the lent GPU machine, after scripts/gpu_prepare.sh here, through the device tool:
#   command: "bash scripts/gpu_check.sh [TRAIN_MINUTES]"   carry: ["data/multi30k", ".whl"]   timeout_s: 600
# In order of what matters most, each step under its own time limit so that one hung step cannot eat the
# lease: the CUDA tests (GPU_CHECK_TESTS=0 skips them); a real training run of configs/multi30k-gpu.yaml for
# at most TRAIN_MINUTES (default 5; early stopping may end it sooner); the throughput benchmark of that config
# with decoding; the run's BLEU on the Multi30k test sets; and, while time is left, the training benchmark at
# two other batch sizes and torch's attention kernels against mt's (scripts/sdpa_backends.py). The last steps
# get what is left of the budget.
# GPU_CHECK_SET="KEY=VALUE ..." adds config overrides (e.g. the winners of scripts/gpu_levers.sh) to the
# training run and `mt bench` (not `name`: the run folder comes from the config file). Everything it prints is also saved under $OUT for BENCHMARKS.md.
set -uo pipefail
minutes=${1:-5}
budget=${GPU_CHECK_SECONDS:-570}  # the whole script; the sweep at the end is skipped when time runs short
config=${GPU_CHECK_CONFIG:-configs/multi30k-gpu.yaml}
run=runs/$(sed -n 's/^name: *//p' "$config")
source scripts/gpu_common.sh
overrides=()  # GPU_CHECK_SET="KEY=VALUE ...": config overrides for the training run and mt bench
read -ra sets <<< "${GPU_CHECK_SET:-}"
for kv in "${sets[@]}"; do overrides+=(--set "$kv"); done

{
  machine
  if [[ ${GPU_CHECK_TESTS:-1} == 1 ]]; then
    step "CUDA tests" 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py \
      tests/test_layers.py tests/test_search.py
  fi
  step "training (at most $minutes min)" $((${minutes%.*} * 60 + 150)) \
    python3 -m mt train --config "$config" --overwrite --set train.max_minutes="$minutes" "${overrides[@]}"
  cp "$run/metrics.jsonl" "$run/train.log" "$out/"
  step "benchmark" $(limit 200) python3 -m mt bench --config "$config" --run "$run" --seconds 10 "${overrides[@]}"
  step "eval" $(limit 120) python3 -m mt eval --run "$run" --beam 5 \
    --test multi30k:test_2016_flickr,multi30k:test_2017_flickr,multi30k:test_2017_mscoco
  for batch in 128000 16000; do
    if ((budget - SECONDS < 60)); then
      echo "== benchmark at train.batch_tokens=$batch: skipped, ${SECONDS} s into a budget of $budget s"
      continue
    fi
    step "benchmark at train.batch_tokens=$batch, training only" $((budget - SECONDS)) python3 -m mt bench \
      --config "$config" --run "$run" --seconds 8 --no-decode "${overrides[@]}" --set train.batch_tokens="$batch"
  done
  if ((budget - SECONDS >= 90)); then
    step "attention kernels" $((budget - SECONDS)) python3 scripts/sdpa_backends.py --config "$config" --run "$run" \
      --seconds 6 --rounds 1
  fi
  echo "== done, ${SECONDS} s"
} 2>&1 | tee "$out/gpu_check.log"
