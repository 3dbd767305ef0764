#!/usr/bin/env bash
# A run beside its CTranslate2 exports, as a user meets them (issue 29's table): exports RUN in float32 and
# int8 into a temporary folder, scores each on the valid splits (beam 5), then times `mt translate --input`
# of the same test sentences with RUN (its own decode precision), RUN in fp32, and both exports, in
# alternating rounds (each one's fastest counts; start-up included), and counts the outputs identical to
# RUN's and to RUN-in-fp32's.
#
# Usage: MT_DATA_PATH=../shared/data bash scripts/export_check.sh RUN [--rounds 2]
#            [--test multi30k:test_2016_flickr] [--valid multi30k:valid,tatoeba:valid]
set -euo pipefail

run=${1:?usage: $0 RUN [--rounds N] [--test NAME:SPLIT] [--valid SPECS]}; shift
rounds=2 test=multi30k:test_2016_flickr valid=multi30k:valid,tatoeba:valid
while (($#)); do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --test) test=$2; shift 2 ;;
    --valid) valid=$2; shift 2 ;;
    *) echo "$0: unknown option $1" >&2; exit 2 ;;
  esac
done
run=$(realpath "$run")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source=$(python -c "import sys; from mt import corpora; print(corpora.resolve(sys.argv[1], 'fr', 'en').src)" "$test")

mt export --run "$run" -o "$work/float32"
mt export --run "$run" --quantization int8 -o "$work/int8"
# The run decoding in fp32: its files, with decode.precision set to fp32 in a copy of its config.
mkdir "$work/fp32"
for f in "$run"/*.pt "$run"/tokenizer.model "$run"/metrics.jsonl; do [[ -e $f ]] && ln -s "$f" "$work/fp32/"; done
python - "$run/config.yaml" "$work/fp32/config.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["decode"]["precision"] = "fp32"
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
PY

declare -A folder=([run]=$run [fp32]=$work/fp32 [float32]=$work/float32 [int8]=$work/int8)
names=(run fp32 float32 int8)
for name in fp32 float32 int8; do
  echo "== valid, beam 5: $name"
  mt eval --run "${folder[$name]}" --test "$valid" --beam 5 | head -n -2
done
for beam in 5 1; do
  declare -A best=()
  for ((round = 1; round <= rounds; round++)); do
    for name in "${names[@]}"; do
      start=$(date +%s.%N)
      mt translate --run "${folder[$name]}" --beam "$beam" --input "$source" > "$work/out.$name.$beam"
      seconds=$(echo "$(date +%s.%N) - $start" | bc)
      if [[ -z ${best[$name]:-} ]] || (($(echo "$seconds < ${best[$name]}" | bc))); then best[$name]=$seconds; fi
    done
  done
  lines=$(wc -l < "$source")
  echo "== beam $beam, $lines sentences of $test, fastest of $rounds rounds (start-up included)"
  for name in "${names[@]}"; do
    same_run=$(paste -d '\t' "$work/out.run.$beam" "$work/out.$name.$beam" | awk -F '\t' '$1 == $2' | wc -l)
    same_fp32=$(paste -d '\t' "$work/out.fp32.$beam" "$work/out.$name.$beam" | awk -F '\t' '$1 == $2' | wc -l)
    printf '%-8s %6.2f s  %6.1f sent/s  %5.2fx run  identical to run %s, to run in fp32 %s\n' "$name" \
      "${best[$name]}" "$(echo "$lines / ${best[$name]}" | bc -l)" "$(echo "${best[run]} / ${best[$name]}" | bc -l)" \
      "$same_run" "$same_fp32"
  done
done
