#!/usr/bin/env bash
# Regenerates the results table of the default model v2 (SmolLM2-135M language model, everyday world):
# docs/results/v2/synthetic.md (+ synthetic.summary.json and one synthetic.<methods>.jsonl / .summary.json per row).
#
# Held-out scenes only: everyday world seed 900001, unbiased. The head map is the one shipped for v2
# (vlm_guard/assets/head_maps/default-$MODEL-*/), calibrated on 48 scenes of the TUNING seed 910001; when it holds tuned
# settings (`vlm-guard tune`, also on the tuning seed 910001 only) the table adds one "@tuned" row per tuned method,
# VHR+VAR+GIFT tuned ("all@tuned") and the tuned default set. Rows without "@tuned" pin the released values.
#
# Resumable: every finished item is on disk; rerun to continue. A larger N only generates the missing items.
#   nohup docs/results/run_synthetic_v2.sh > runs/eval_synthetic_v2.log 2>&1 &
#
# MODEL=v3 (what run_synthetic_v3.sh sets) runs the same table for default model v3 on its everyday_v3 world, into
# docs/results/v3, with the head map shipped for v3; TASKS=chair keeps the caption columns only.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${MODEL:-v2}"
case "$MODEL" in
  v2) WORLD=everyday ;;
  v3) WORLD=everyday_v3; export VLM_GUARD_DEFAULT_MODEL=v3 ;;
  *) echo "MODEL must be v2 or v3, got '$MODEL'" >&2; exit 2 ;;
esac
VLM="${VLM:-.venv/bin/vlm-guard}"
PY="${PY:-.venv/bin/python}"
OUT_DIR="${OUT_DIR:-docs/results/$MODEL}"
THREADS="${THREADS:-1}"              # 1: small models run fastest unthreaded on the 2 shared cores
N_QUESTIONS="${N_QUESTIONS:-300}"    # per POPE split
N_CAPTIONS="${N_CAPTIONS:-300}"
TASKS="${TASKS:-pope,chair}"         # TASKS=chair: the caption columns only (POPE costs 900 prefills per row)
mkdir -p "$OUT_DIR"

HEAD_MAP="$(ls -d vlm_guard/assets/head_maps/default-$MODEL-*/ | head -1)"
HEAD_MAP="${HEAD_MAP%/}"
COMPARE="${COMPARE:-}"
if [ -z "$COMPARE" ]; then
  if [ "${TUNED:-1}" = 1 ]; then
    COMPARE="$("$PY" docs/results/table_rows.py "$HEAD_MAP/head_map.json")"   # tuned rows, then the released ones
  else
    COMPARE="none;vhr;var;gift;all;pai;vcd"
  fi
fi
echo "$(date -u +%H:%M:%S) model: shipped default $MODEL; head map: $HEAD_MAP; rows: $COMPARE"

"$VLM" -v eval synthetic --world "$WORLD" --head-map "$HEAD_MAP" \
  --n-questions "$N_QUESTIONS" --n-captions "$N_CAPTIONS" --batch-size 32 --threads "$THREADS" --no-progress \
  --tasks "$TASKS" --compare "$COMPARE" --out "$OUT_DIR/synthetic.jsonl"
echo "$(date -u +%H:%M:%S) done: $OUT_DIR/synthetic.md"
if [ "$MODEL" = v2 ]; then
  "$PY" docs/results/targets_v2.py "$OUT_DIR"   # the issue-13 targets, appended to synthetic.md
fi
