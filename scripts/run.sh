#!/usr/bin/env bash
# The main job in one command on a fresh machine: set up (idempotent), then train and evaluate on the shared data.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
exec "$VENV/bin/ctd-monitor" train --out "${CTD_BUNDLE:-runs/bundle}" "$@"
