#!/usr/bin/env bash
# Ship default model v3 from a finished training run (python -m toyworld.v3.train --out RUN):
#   1. the v3 report on the exported weights (every bar of the v3 issue, held-out seed; ~35 min on one core),
#      run in the background while
#   2. the trained parts (RUN/final: vision tower, projector, adapters; ~12 MB) are copied into
#      vlm_guard/assets/default_model_v3 (the run folder named relative to the repository, no absolute path),
#   3. 48 tuning-seed everyday_v3 scenes are drawn and the head map is calibrated on them (vlm-guard calibrate), and
#   4. that map is shipped in vlm_guard/assets/head_maps/<model>-<cache key>/ (the model named by its folder name).
# Tuning (vlm-guard tune --profiles caption --methods ...) and the held-out table (TASKS=chair
# docs/results/run_synthetic_v3.sh) come after; see docs/results/README.md.
#
# Every step is skipped when its output is already there, so a rerun resumes. Run from anywhere:
#   RUN=/root/vlm-guard-runs/v3b bash docs/results/ship_v3.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:?set RUN to the training folder (python -m toyworld.v3.train --out RUN)}
WORK=${WORK:-runs/ship_v3/$(basename "$RUN")}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FINAL=$RUN/final
DEST=vlm_guard/assets/default_model_v3
if [ ! -f "$FINAL/v3_weights.safetensors" ]; then
  echo "ship_v3: $FINAL/v3_weights.safetensors is missing: the training has not finished (resume it with python -m toyworld.v3.train --out $RUN --resume)" >&2
  exit 1
fi
mkdir -p "$WORK"
log() { echo "$(date -u +%H:%M:%S) ship_v3: $*"; }

report_pid=""
if [ ! -f "$WORK/report.json" ]; then
  log "v3 report in the background -> $WORK/report.json (log $WORK/report.log)"
  $PY -m toyworld.v3.report --weights "$FINAL" --out "$WORK/report.json" --threads 1 >"$WORK/report.log" 2>&1 &
  report_pid=$!
fi

if ! cmp -s "$FINAL/v3_weights.safetensors" "$DEST/v3_weights.safetensors"; then
  log "shipping the trained parts into $DEST"
  mkdir -p "$DEST"
  cp "$FINAL/v3_weights.safetensors" "$DEST/v3_weights.safetensors.tmp"
  mv "$DEST/v3_weights.safetensors.tmp" "$DEST/v3_weights.safetensors"
  RUN_NAME=$(basename "$RUN") $PY - "$FINAL/v3_config.json" "$DEST/v3_config.json" <<'EOF'
import json, os, sys
config = json.load(open(sys.argv[1]))
config["train_config"]["out_dir"] = "runs/" + os.environ["RUN_NAME"]
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(config, f, indent=1)
    f.write("\n")
os.replace(tmp, sys.argv[2])
EOF
  chmod 644 "$DEST"/*
fi

if [ ! -f "$WORK/calib/scene_000047.png" ]; then
  log "48 tuning-seed scenes -> $WORK/calib"
  .venv/bin/vlm-guard eval synthetic-images --world everyday_v3 --n 48 --out "$WORK/calib"
fi

if [ ! -f "$WORK/head_map/head_map.json" ]; then
  log "calibrating -> $WORK/head_map"
  VLM_GUARD_DEFAULT_MODEL=v3 .venv/bin/vlm-guard calibrate --images "$WORK/calib" --out "$WORK/head_map" --no-cache
fi

log "shipping the head map"
$PY - "$WORK/head_map" <<'EOF'
import json, shutil, sys
from pathlib import Path
from vlm_guard.calibration.head_map import cache_folder
from vlm_guard.calibration.shipped import SHIPPED_HEAD_MAPS

source = Path(sys.argv[1])
meta = json.loads((source / "head_map.json").read_text())
meta["fingerprint"]["name_or_path"] = Path(meta["fingerprint"]["name_or_path"]).name
dest = cache_folder(meta["fingerprint"], SHIPPED_HEAD_MAPS)
for old in SHIPPED_HEAD_MAPS.glob("default-v3-*"):
    if old != dest:
        shutil.rmtree(old)
dest.mkdir(parents=True, exist_ok=True)
shutil.copyfile(source / "head_map.safetensors", dest / "head_map.safetensors")
tmp = dest / "head_map.json.tmp"
tmp.write_text(json.dumps(meta, indent=1) + "\n")
tmp.replace(dest / "head_map.json")
print(dest)
EOF

if [ -n "$report_pid" ]; then
  log "waiting for the report"
  wait "$report_pid"
fi
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r['bars'], indent=1))" "$WORK/report.json"
log "done"
