#!/usr/bin/env bash
# Set up .venv (if needed) and caption an image with the shipped default model, plain vs guarded.
#   bash scripts/caption.sh                       # a bundled example image
#   bash scripts/caption.sh my.png --check        # any arguments of `vlm-guard caption`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$root/.venv/bin/vlm-guard" caption "$@"
