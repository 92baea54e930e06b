#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (pytest exits non-zero when no test ran). The 15 slowest
# tests are listed at the end: the Ray service runs, each about 45 s of actor, Serve and Train start-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
