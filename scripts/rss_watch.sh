#!/usr/bin/env bash
# Trains the default config for MINUTES (default 1.3) in a temporary folder, prints the resident memory of
# `mt train` every 10 s, then the tokens/s it logged. Extra arguments are environment settings for the run,
# e.g. MALLOC_MMAP_THRESHOLD_=65536, to compare allocator settings side by side.
# Usage: MT_DATA_PATH=../shared/data scripts/rss_watch.sh [MINUTES] [VAR=VALUE ...]
set -euo pipefail
minutes=${1:-1.3}
shift || true
mt=$(command -v mt)
dir=$(mktemp -d)
cd "$dir"
env "$@" "$mt" train --quiet --set name=rss --set train.log_every=20 --set "train.max_minutes=$minutes" \
  --set train.average_last=0 --set train.tune_decoding=false >/dev/null 2>&1 &
pid=$!
samples=""
while kill -0 "$pid" 2>/dev/null; do
  sleep 10
  rss=$(ps -o rss= -p "$pid" 2>/dev/null || true)
  [ -n "$rss" ] && samples="$samples $((rss / 1024))"
done
echo "settings: ${*:-none}"
echo "RSS every 10 s (MiB):$samples"
python3 -c "
import json
rows = [json.loads(l) for l in open('runs/rss/metrics.jsonl') if 'tokens_per_s' in l]
print('tokens/s every 20 steps:', [round(r['tokens_per_s']) for r in rows])"
rm -rf "$dir"
