#!/usr/bin/env bash
# The main job in one command on a fresh machine: set up (idempotent), then the CTD method on the shared data:
# train probe + expert, train the DV head, calibrate the budget, evaluate every policy. Cached steps are instant.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
CTD="$VENV/bin/ctd-monitor"
BUNDLE="${CTD_BUNDLE:-runs/bundle}"
ALPHA="${CTD_ALPHA:-0.1}"
"$CTD" train --out "$BUNDLE"
"$CTD" train-dv --bundle "$BUNDLE"
"$CTD" calibrate --bundle "$BUNDLE" --alpha "$ALPHA" --delta 0.1
"$CTD" evaluate --bundle "$BUNDLE" --budgets 0.05,0.1,0.2,0.3 --out "${CTD_EVAL_OUT:-runs/eval}"
echo "report: ${CTD_EVAL_OUT:-runs/eval}/report.md"
