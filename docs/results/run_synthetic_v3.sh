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
# The script is run_synthetic_v2.sh with MODEL=v3 (same options: N_QUESTIONS, N_CAPTIONS, TASKS, COMPARE, TUNED,
# THREADS, OUT_DIR).
set -euo pipefail
MODEL=v3 exec "$(dirname "$0")/run_synthetic_v2.sh" "$@"
