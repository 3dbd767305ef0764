# Sourced by scripts/gpu_check.sh on the lent GPU machine: installs the carried wheels, sets the environment,
# and defines `limit`, `step` and `machine`. Expects $budget (seconds for the whole script).
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then  # pip's output kept in $OUT: a failed install is the only trace left
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MT_DATA_PATH="$PWD/data"

limit() {  # the smaller of $1 seconds and what is left of the budget, at least 1
  local left=$((budget - SECONDS)) want=$1
  ((want < left)) || want=$left
  echo $((want > 1 ? want : 1))
}

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit and says how long it took
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s, ${SECONDS} s into the script)"
  timeout --kill-after=10 "$limit" "$@"
  echo "-- $name: exit $?, $((SECONDS - start)) s"
}

machine() {  # what the log needs to name the machine and the code
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; date -u
  echo "commit (from gpu_prepare.sh): $(cat .whl/COMMIT 2>/dev/null || echo unknown)"
}
