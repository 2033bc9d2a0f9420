#!/usr/bin/env bash
# The CTD method measured offline on the full default data mix (tens of minutes on a 2-core CPU the first
# time; cached afterwards): train probe + expert, DV head, LTT calibration at alpha, every policy evaluated.
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
