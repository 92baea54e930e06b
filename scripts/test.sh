#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (pytest exits non-zero when no test ran).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
