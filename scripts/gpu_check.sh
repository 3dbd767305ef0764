#!/usr/bin/env bash
# Run ON the lent GPU machine, after scripts/gpu_prepare.sh here, through the device tool:
#   command: "bash scripts/gpu_check.sh [TRAIN_MINUTES]"   carry: ["data/multi30k", ".whl"]   timeout_s: 600
# It runs the CUDA tests, the throughput benchmark on configs/multi30k-gpu.yaml, a real training run of
# TRAIN_MINUTES (default 5; the config's own budget is 10, which needs a call of its own) and its BLEU on
# the Multi30k test sets. Everything it prints is also saved under $OUT for BENCHMARKS.md.
set -uo pipefail
minutes=${1:-5}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MT_DATA_PATH="$PWD/data"
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || true; date -u
  echo "== CUDA tests"; python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py tests/test_layers.py tests/test_search.py
  echo "== training ($minutes min)"
  /usr/bin/time -v python3 -m mt train --config configs/multi30k-gpu.yaml --quiet --overwrite \
    --set train.max_minutes="$minutes" 2> "$out/train_time.txt"
  grep -E "Elapsed|Maximum resident" "$out/train_time.txt"
  cp runs/multi30k-gpu/metrics.jsonl "$out/metrics.jsonl"
  echo "== eval"
  time python3 -m mt eval --run runs/multi30k-gpu --beam 5 \
    --test multi30k:test_2016_flickr,multi30k:test_2017_flickr,multi30k:test_2017_mscoco
  echo "== benchmark"
  python3 -m mt bench --config configs/multi30k-gpu.yaml --run runs/multi30k-gpu --seconds 20
} 2>&1 | tee "$out/gpu_check.log"
