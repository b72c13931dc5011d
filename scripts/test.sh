#!/usr/bin/env bash
# Set up .venv with the dev extras (if needed), check the code (ruff lint and format, the import layers) and run the
# test suite. Extra arguments go to pytest.
#   bash scripts/test.sh                   # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"     # the fast tier
#   bash scripts/test.sh -k core -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh dev
# the demo's browser test drives Debian's Chromium; install it when we may (root), else that test skips
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] could not install chromium: the browser test will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "[test] ruff check, ruff format --check, lint-imports"
.venv/bin/ruff check --quiet vlm_guard toyworld tests scripts docs
.venv/bin/ruff format --check --quiet vlm_guard toyworld tests scripts docs
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
echo "[test] transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
exec .venv/bin/python -m pytest -q "$@"
