#!/usr/bin/env bash
# Tune each mission method of default model v3 for captions (the caption task profile), one method at a time:
#   vlm-guard tune --profiles caption --methods M   for M in $METHODS (default gift vhr var)
# on the tuning seed 910001 (winners confirmed on 910002; the reported seed 900001 is never used), each over its
# strength ladder on its released layer band (vlm_guard.tuning.space.profile_candidates), with paired intervals.
# All runs share one --out folder, so greedy's items are generated once and every candidate's items are kept; after
# each method its tuned map and table are copied to $OUT/<method>/ (the caption profile holds that method's winner,
# or greedy when none confirmed). Resumable: rerun the same command after any interruption.
#
#   nohup bash docs/results/tune_v3.sh > runs/tune_v3.log 2>&1 &
#   METHODS="vhr var" N=300 bash docs/results/tune_v3.sh
#
# Needs the v3 head map shipped (docs/results/ship_v3.sh). Then: docs/results/ship_profiles_v2.py --model v3
# $OUT/<method> (the profile to ship), and TASKS=chair docs/results/run_synthetic_v3.sh (the held-out table).
set -euo pipefail
cd "$(dirname "$0")/../.."
export VLM_GUARD_DEFAULT_MODEL=v3 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
METHODS="${METHODS:-gift vhr var}"
OUT="${OUT:-runs/tune_profiles_v3}"
N="${N:-300}"                      # captions the tuning (and the confirmation) split offers
BUDGET="${BUDGET:-900}"            # minutes, resumed runs included
THREADS="${THREADS:-1}"
HEAD_MAP="$(ls -d vlm_guard/assets/head_maps/default-v3-*/ 2>/dev/null | head -1)"
HEAD_MAP="${HEAD_MAP%/}"
if [ -z "$HEAD_MAP" ]; then
  echo "tune_v3: no head map shipped for v3 (vlm_guard/assets/head_maps/default-v3-*): run docs/results/ship_v3.sh" >&2
  exit 1
fi
for method in $METHODS; do
  if [ -f "$OUT/$method/head_map.json" ]; then
    echo "$(date -u +%H:%M:%S) tune_v3: $method already tuned ($OUT/$method)"
    continue
  fi
  echo "$(date -u +%H:%M:%S) tune_v3: tuning $method (head map $HEAD_MAP, out $OUT)"
  .venv/bin/vlm-guard -v tune --profiles caption --methods "$method" --head-map "$HEAD_MAP" --out "$OUT" \
    --n-captions "$N" --n-questions "$N" --budget "$BUDGET" --batch-size 30 --threads "$THREADS" --no-progress
  mkdir -p "$OUT/$method.tmp"
  cp "$OUT/head_map.json" "$OUT/head_map.safetensors" "$OUT/tuning.md" "$OUT"/tune_profiles_state.*.json "$OUT/$method.tmp/"
  rm -rf "$OUT/$method" && mv "$OUT/$method.tmp" "$OUT/$method"
  echo "$(date -u +%H:%M:%S) tune_v3: $method done"
done
echo "$(date -u +%H:%M:%S) tune_v3: done"
