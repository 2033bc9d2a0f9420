#!/usr/bin/env bash
# The test command: the whole suite (unit, real models, real Kafka broker), against the set-up venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "no venv at $VENV: run ./scripts/setup.sh first" >&2
  exit 2
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
