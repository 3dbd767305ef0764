#!/usr/bin/env bash
# The GPU check: the CUDA tests, the training levers side by side, optionally a short real training run.
#   bash scripts/gpu_check.sh prepare     HERE (PyPI, no GPU): copies Multi30k from ${MT_DATA_PATH:-../shared/data}
#       into data/multi30k and the wheels of datasets (CPython 3.12, manylinux x86_64) into .whl/, both
#       git-ignored, then prints the device-tool call (command, carry, timeout).
#   bash scripts/gpu_check.sh [MINUTES]   ON any GPU machine, in the repository root. Assumes nothing of how the
#       files got there: the installed datasets, else .whl/; data/multi30k if there, else the environment's
#       MT_DATA_PATH; src/ on PYTHONPATH. Each step has a time limit within GPU_CHECK_SECONDS (default 480):
#       (1) tests/test_cuda.py, tests/test_attention.py; (2) `mt bench --no-decode` of each lever (eager,
#       compiled, eager 128k), each with its roof and MFU; (3) with MINUTES > 0 and the time, `mt train` for
#       at most MINUTES, then `mt eval` on the Multi30k test sets (and tatoeba:test when the config trains on
#       Tatoeba). GPU_CHECK_SKIP="tests levers" skips (1), (2). GPU_CHECK_CONFIG picks the config (default
#       configs/multi30k-gpu.yaml; the general row: GPU_CHECK_CONFIG=configs/general-gpu.yaml ... 15).
# The log (gpu_check.log) and the run's metrics.jsonl and train.log go to ${OUT:-/tmp/gpu_check}.
set -uo pipefail
cd "$(dirname "$0")/.."
config=${GPU_CHECK_CONFIG:-configs/multi30k-gpu.yaml}

if [[ ${1:-} == prepare ]]; then
  set -e
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" data/multi30k .whl
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  data_path=${MT_DATA_PATH:-../shared/data}
  cp "${data_path%%:*}"/multi30k/* data/multi30k/  # the first folder of a MT_DATA_PATH list
  if grep -q tatoeba "$config"; then mkdir -p data/tatoeba && cp "${data_path%%:*}"/tatoeba/* data/tatoeba/; fi
  rm -f .whl/*.whl  # two versions of one package would stop the install there
  for pkg in datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg"
  done
  # The commit being checked, for the log: the GPU machine's copy of .git can lag behind the working tree.
  { git rev-parse HEAD; git status --short --untracked-files=no; } > .whl/COMMIT
  echo 'prepared; now call the device tool with command "bash scripts/gpu_check.sh [MINUTES]",' \
    "carry [\"data/multi30k\", \"data/tatoeba\", \".whl\"] (data/tatoeba if $config needs it), timeout_s 510" \
    "${GPU_CHECK_CONFIG:+, with GPU_CHECK_CONFIG=$config before the command}"
  exit 0
fi

minutes=${1:-0}
[[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "usage: bash scripts/gpu_check.sh [prepare | MINUTES]" >&2; exit 2; }
whole_minutes=${minutes%.*}  # rounded up: bash counts in integers; train.max_minutes takes the number as given
[[ $minutes == *.* ]] && ((whole_minutes++))
train_limit=$((whole_minutes * 60 + 150))  # data preparation, and averaging and tuning at the end
budget=${GPU_CHECK_SECONDS:-480} skip=${GPU_CHECK_SKIP:-} out=${OUT:-/tmp/gpu_check}
name=$(sed -n 's/^name: *//p' "$config") && run=runs/${name:-$(basename "$config" .yaml)}
mkdir -p "$out"

limit() { local left=$((budget - SECONDS)); echo $(($1 < left ? $1 : left)); }  # $1 s, or what is left
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit and says how long it took
  local name=$1 limit=$2 start=$SECONDS && shift 2
  ((limit >= 10)) || { echo "== $name: skipped, ${SECONDS} s into a budget of $budget s"; return; }
  echo "== $name (limit ${limit} s, ${SECONDS} s into the script)"
  timeout --kill-after=10 "$limit" "$@"
  echo "-- $name: exit $?, $((SECONDS - start)) s"
}

main() {
  if ! python3 -c "import datasets" 2>/dev/null; then
    compgen -G ".whl/*.whl" >/dev/null || {
      echo "gpu_check: python3 lacks datasets: run 'bash scripts/gpu_check.sh prepare' here first, or pip install it"
      exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl > "$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  [[ -d data/multi30k ]] && export MT_DATA_PATH=$PWD/data
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  echo "$(nproc) CPUs, $(date -u), MT_DATA_PATH=${MT_DATA_PATH:-unset}"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown); prepared at: $(cat .whl/COMMIT 2>/dev/null || echo never)"
  [[ $skip == *tests* ]] || step "CUDA tests" "$(limit 90)" \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py
  if [[ $skip != *levers* ]]; then
    for lever in "eager:" "compiled:train.compile=true" "eager 128k:train.batch_tokens=128000"; do
      sets=() && read -ra kvs <<< "${lever#*:}"
      for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
      step "lever: ${lever%%:*}" "$(limit 150)" \
        python3 -m mt bench --config "$config" --seconds 8 --no-decode "${sets[@]}"
    done
  fi
  if ((whole_minutes > 0 && budget - SECONDS > train_limit + 40)); then
    step "training (at most $minutes min)" "$train_limit" \
      python3 -m mt train --config "$config" --overwrite --set train.max_minutes="$minutes"
    cp "$run/metrics.jsonl" "$run/train.log" "$out/"
    tests=multi30k:test_2016_flickr,multi30k:test_2017_flickr,multi30k:test_2017_mscoco
    grep -q tatoeba "$config" && tests+=,tatoeba:test
    step "eval" "$(limit 60)" python3 -m mt eval --run "$run" --beam 5 --test "$tests"
  elif ((whole_minutes > 0)); then
    echo "== training: skipped, ${SECONDS} s into a budget of $budget s (GPU_CHECK_SKIP=\"tests levers\" makes room)"
  fi
  echo "== done, ${SECONDS} s"
}

main 2>&1 | tee "$out/gpu_check.log"
