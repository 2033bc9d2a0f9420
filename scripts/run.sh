#!/usr/bin/env bash
# The main job in one command on a fresh machine: set up (idempotent), then the demo: train or reuse a
# calibrated bundle and expert on a slice of the shared data, start the embedded Kafka broker, the monitor
# worker, the guard service and the alerter, replay held-out labelled conversations and print the summary.
# Extra arguments go to `ctd-monitor demo` (e.g. --events 500 --alpha 0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
exec "$VENV/bin/ctd-monitor" demo "$@"
