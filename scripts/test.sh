#!/usr/bin/env bash
# The test command: the whole suite (unit, real models, real Kafka broker), against the set-up venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "no venv at $VENV: run ./scripts/setup.sh first" >&2
  exit 2
fi
# -rs: a skipped test (e.g. the container tests without podman) says why.
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
