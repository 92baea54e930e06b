#!/usr/bin/env bash
# Create .venv and install egrpo-ray with its pinned dependencies (idempotent: reinstalls only when
# pyproject.toml changed). torch and torchvision are pinned in pyproject.toml; never let pip pick one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.egrpo-ray-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "egrpo-ray: installing into .venv (first run takes a few minutes)..." >&2
  # quiet: no progress bars, version nags or script-location notes; errors (and conflicts) still show
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PIP_PROGRESS_BAR=off
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
