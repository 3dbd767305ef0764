#!/usr/bin/env bash
# Speed of several commits side by side: `mt bench --no-reference` of each commit in turn, round after round,
# in one run, so that the machine's drift falls on all of them alike. Each commit is checked out in a
# temporary worktree, with its own config file, and run with this checkout's virtualenv.
# Training (the default): `--no-decode`; prints each run's roof, target tokens/s, MFU and peak RSS, then each
# commit's mean tokens/s and its ratio to the first commit's.
# Decoding (`--decode`, needs `--run`, a run every commit can load): beam 5 sentences/s of the run's model on
# `--sentences` test sentences instead, and their means and ratios.
#
# Usage: MT_DATA_PATH=../shared/data scripts/ab_train.sh [--rounds 2] [--seconds 30] [--run RUN]
#            [--decode] [--sentences 500] [--config configs/multi30k.yaml] REV [REV ...]
set -euo pipefail

rounds=2 seconds=30 run="" config=configs/multi30k.yaml decode=0 sentences=500
revs=()
while (($#)); do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --run) run=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --decode) decode=1; shift ;;
    --sentences) sentences=$2; shift 2 ;;
    *) revs+=("$1"); shift ;;
  esac
done
((${#revs[@]})) || { echo "usage: $0 [--rounds N] [--seconds S] [--run RUN] [--decode] [--sentences N] [--config C]" \
  "REV [REV ...]" >&2; exit 2; }
((decode == 0)) || [[ -n $run ]] || { echo "$0: --decode times the model of --run RUN" >&2; exit 2; }

root=$(git rev-parse --show-toplevel)
for rev in "${revs[@]}"; do
  git -C "$root" rev-parse --verify --quiet "$rev^{commit}" >/dev/null \
    || { echo "$0: $rev is not a commit of $root" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'for d in "$work"/*/; do git -C "$root" worktree remove --force "$d" >/dev/null 2>&1 || true; done; rm -rf "$work"' EXIT
if [[ -n ${MT_DATA_PATH:-} ]]; then  # the runs start in the worktrees: make relative folders absolute
  MT_DATA_PATH=$(tr ':' '\n' <<<"$MT_DATA_PATH" | while read -r d; do realpath -m "$d"; done | paste -sd:)
  export MT_DATA_PATH
fi
args=(--config "$config" --no-reference --seconds "$seconds")
row="train ours: target tokens/s" unit="tok/s"
if ((decode)); then
  args+=(--sentences "$sentences" --rounds 2) row="beam 5 ours (KV cache): sentences/s" unit="sent/s"
else
  args+=(--no-decode)
fi
[[ -n $run ]] && args+=(--run "$(realpath "$run")")

for i in "${!revs[@]}"; do
  git -C "$root" worktree add --detach --quiet "$work/$i" "${revs[$i]}"
  echo "$i: ${revs[$i]} = $(git -C "$root" rev-parse --short "${revs[$i]}")"
done
for round in $(seq "$rounds"); do
  for i in "${!revs[@]}"; do
    out=$(cd "$work/$i" && PYTHONPATH="$work/$i/src" python -m mt bench "${args[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
    tokens=$(grep -F "$row" <<<"$out" | awk -F'|' '{gsub(/[ ,]/, "", $3); print $3}')
    summary=$( (grep -m1 "roof:" <<<"$out"; grep -E "train ours: (MFU|peak)" <<<"$out") \
      | awk -F'|' '{for (f = 2; f <= 4; f++) gsub(/^ +| +$/, "", $f); printf " %s %s %s;", $2, $3, $4}')
    echo "round $round, ${revs[$i]}: $tokens $unit;$summary"
    echo "$i $tokens" >>"$work/tokens"
  done
done
awk -v unit="$unit" '{sum[$1] += $2; n[$1]++} END {for (i = 0; i in n; i++) {mean = sum[i] / n[i];
  if (i == 0) first = mean; printf "%d: mean %.1f %s over %d rounds, %.3fx the first\n", i, mean, unit, n[i],
  mean / first}}' "$work/tokens"
