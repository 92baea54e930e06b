#!/usr/bin/env bash
# Set everything up, then run the main job: E-GRPO on the shipped tiny model on a local Ray cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/egrpo-ray train --config configs/tiny.yaml "$@"
