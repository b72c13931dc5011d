#!/usr/bin/env bash
# Regenerates the results table of default model v3 (SmolLM2-135M language model, everyday_v3 world: 144 image
# tokens, long detail descriptions): docs/results/v3/synthetic.md (+ synthetic.summary.json and one
# synthetic.<methods>.jsonl / .summary.json per row).
#
# Held-out scenes only: everyday_v3 world seed 900001 (independent object types, 3-5 objects per scene). The head
# map is the one shipped for v3 (vlm_guard/assets/head_maps/default-v3-*/), calibrated on 48 scenes of the TUNING
# seed 910001 (`vlm-guard eval synthetic-images --world everyday_v3 --n 48` + `vlm-guard calibrate`); when it holds
# tuned settings (`vlm-guard tune`, on the tuning seed only) the table adds one "@tuned" row per tuned method. Rows
# without "@tuned" pin the released values.
#
# Resumable: every finished item is on disk; rerun to continue. A larger N only generates the missing items. Rows can
# be split over processes with disjoint COMPARE lists (e.g. COMPARE="none;vhr;var" and COMPARE="none;gift;all"); a
# final run with every row assembles the table from the files.
#   VLM_GUARD_DEFAULT_MODEL=v3 nohup docs/results/run_synthetic_v3.sh > runs/eval_synthetic_v3.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export VLM_GUARD_DEFAULT_MODEL=v3
VLM="${VLM:-.venv/bin/vlm-guard}"
PY="${PY:-.venv/bin/python}"
OUT_DIR="${OUT_DIR:-docs/results/v3}"
THREADS="${THREADS:-1}"              # 1: small models run fastest unthreaded on the 2 shared cores
N_QUESTIONS="${N_QUESTIONS:-300}"    # per POPE split
N_CAPTIONS="${N_CAPTIONS:-300}"
TASKS="${TASKS:-pope,chair}"         # TASKS=chair: the caption columns only (POPE costs 900 prefills per row)
mkdir -p "$OUT_DIR"

HEAD_MAP="$(ls -d vlm_guard/assets/head_maps/default-v3-*/ | head -1)"
HEAD_MAP="${HEAD_MAP%/}"
COMPARE="${COMPARE:-}"
if [ -z "$COMPARE" ]; then
  if [ "${TUNED:-1}" = 1 ]; then
    COMPARE="$("$PY" docs/results/table_rows.py "$HEAD_MAP/head_map.json")"   # tuned rows, then the released ones
  else
    COMPARE="none;vhr;var;gift;all;pai;vcd"
  fi
fi
echo "$(date -u +%H:%M:%S) model: shipped default v3; head map: $HEAD_MAP; rows: $COMPARE"

"$VLM" -v eval synthetic --world everyday_v3 --head-map "$HEAD_MAP" \
  --n-questions "$N_QUESTIONS" --n-captions "$N_CAPTIONS" --batch-size 32 --threads "$THREADS" --no-progress \
  --tasks "$TASKS" --compare "$COMPARE" --out "$OUT_DIR/synthetic.jsonl"
echo "$(date -u +%H:%M:%S) done: $OUT_DIR/synthetic.md"
