#!/usr/bin/env bash
# Build the container images with podman on a machine that reaches package registries but no image registry:
#   ./scripts/images.sh [--bootstrap-only] [cpu] [guard] [gpu] [kafka] [prometheus]   (default: cpu guard gpu)
# 1. installs podman, buildah, mmdebstrap and runc with apt-get when missing (root), and writes
#    /etc/containers/containers.conf for this kind of kernel (runc: crun fails on the hybrid cgroups and on raising
#    rlimits; cgroupfs; file events; ulimits);
# 2. makes a local Debian bookworm base image (mmdebstrap from the host's apt mirrors, then `podman import`),
#    cached outside the repo (CTD_IMAGES_CACHE, default ~/.cache/ctd-monitor/images);
# 3. builds ctd-monitor:cpu, ctd-monitor:guard and ctd-monitor:gpu FROM that base with --network host, the host's
#    CA bundle and a pip.conf naming it mounted read-only (build-time mounts: nothing of them stays in an image);
#    pip downloads go to the build's cache mount (/root/.cache/pip), never into a layer (buildah 1.28 does not
#    keep that mount between builds, so a rebuild downloads the wheels again; unchanged images are skipped);
#    `kafka` and `prometheus` build stand-ins for the compose stack's public images (docker/compose.local.yaml):
#    the cached Kafka jars and Debian's prometheus package on the same base;
# 4. prints the image sizes.
# CTD_BASE_IMAGE=<image> skips the local base (e.g. python:3.11.14-slim-bookworm where a registry is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${CTD_IMAGES_CACHE:-$HOME/.cache/ctd-monitor/images}"
BASE="${CTD_BASE_IMAGE:-localhost/ctd-base:bookworm}"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
BOOTSTRAP_ONLY=0
TARGETS=()
for arg in "$@"; do
  case "$arg" in
    --bootstrap-only) BOOTSTRAP_ONLY=1 ;;
    cpu|guard|gpu|kafka|prometheus) TARGETS+=("$arg") ;;
    *) echo "usage: $0 [--bootstrap-only] [cpu] [guard] [gpu] [kafka] [prometheus]" >&2; exit 2 ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(cpu guard gpu)

say() { echo "images: $*" >&2; }

ensure_tools() {
  local missing=()
  for tool in podman buildah mmdebstrap runc; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { say "missing ${missing[*]}: install them (apt-get install podman buildah mmdebstrap runc)"; exit 2; }
    say "installing ${missing[*]} (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah mmdebstrap runc >/dev/null
  fi
}

CONF=/etc/containers/containers.conf
MARK="# written by ctd-monitor scripts/images.sh"
ensure_conf() {
  if grep -qF "$MARK" "$CONF" 2>/dev/null; then return; fi
  [ "$(id -u)" -eq 0 ] || { say "not root: leaving $CONF as it is"; return; }
  if [ -s "$CONF" ]; then cp "$CONF" "$CONF.before-ctd"; say "kept the previous $CONF as $CONF.before-ctd"; fi
  mkdir -p /etc/containers
  cat > "$CONF" <<EOF
$MARK
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
}

# The host's apt sources (one-line *.list and deb822 *.sources files) are the mirrors this machine can reach.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^(deb |URIs:)' "$f" && grep -q debian "$f" && echo "$f"
  done
  return 0
}

ensure_base() {
  if [ "$BASE" != "localhost/ctd-base:bookworm" ] || podman image exists "$BASE"; then return; fi
  mkdir -p "$CACHE"
  local tar="$CACHE/rootfs-bookworm.tar"
  if [ ! -f "$tar" ] || [ ! -s "$tar" ]; then
    mapfile -t sources < <(apt_sources)
    [ ${#sources[@]} -gt 0 ] || { say "no Debian apt sources under /etc/apt to bootstrap from"; exit 2; }
    say "bootstrapping Debian bookworm (mmdebstrap, ${sources[*]})"
    # mmdebstrap picks its output format from the file name, and "*.part" would be a directory tree: say tar.
    # A directory left by such a run is removed first.
    rm -rf "$tar" "$tar.part"
    mmdebstrap --quiet --format=tar --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$tar.part" "${sources[@]}"
    mv "$tar.part" "$tar"
  fi
  podman import --quiet "$tar" "$BASE" >/dev/null
  say "base image $BASE imported from $tar"
}

# The CA bundle the host's TLS clients use (a proxy's CA may be in it); pip in the build is told to use it.
ca_bundle() {
  local f
  for f in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    [ -n "$f" ] && [ -s "$f" ] && { echo "$f"; return; }
  done
  echo ""
}

# A digest of everything a build reads (Dockerfile, copied sources, base image, torch index, Kafka jars): an image
# labelled with the same digest is up to date and not rebuilt. (Checking buildah's layer cache alone costs
# minutes: it hashes the multi-GB venv that the runtime stage copies.)
inputs_digest() {
  local dockerfile="$1"; shift
  {
    echo "$BASE_ID $TORCH_INDEX"
    cat "$dockerfile"
    if [ $# -gt 0 ]; then
      find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort | xargs -r sha256sum
    fi
  } | sha256sum | cut -c1-32
}

build() {
  local target="$1" dockerfile base_arg tag="ctd-monitor:$target"
  # --force-rm: a failed build leaves no working container behind (each holds a multi-GB venv layer).
  local args=(--network host --layers --force-rm)
  # README.md is copied too, but only as the package's long description: editing it does not rebuild.
  local inputs=(docker/constraints.txt pyproject.toml probes worker)
  case "$target" in
    cpu) dockerfile=docker/Dockerfile.cpu; base_arg=PYTHON_IMAGE ;;
    guard) dockerfile=docker/Dockerfile.guard; base_arg=PYTHON_IMAGE ;;
    gpu) dockerfile=docker/Dockerfile.gpu; base_arg=CUDA_IMAGE ;;
    kafka)
      dockerfile=docker/Dockerfile.kafka; base_arg=BASE_IMAGE; tag="ctd-kafka:4.1.1"
      local cache_root="${CTD_CACHE_DIR:-$HOME/.cache/ctd-monitor}"
      local libs="$cache_root/kafka/4.1.1/libs"
      if [ ! -f "$libs/kafka_2.13-4.1.1.jar" ]; then
        say "fetching the Kafka jars (ctd-monitor broker --fetch-only)"
        "${CTD_VENV:-$HOME/.cache/ctd-monitor/venv}/bin/ctd-monitor" broker --fetch-only >/dev/null
      fi
      args+=(-v "$libs:/kafka-libs:ro"); inputs=(docker/kafka "$libs") ;;
    prometheus)
      dockerfile=docker/Dockerfile.prometheus; base_arg=BASE_IMAGE; tag="ctd-prometheus:bookworm"; inputs=() ;;
  esac
  local digest
  digest="$(inputs_digest "$dockerfile" "${inputs[@]}")"
  if [ "$(podman image inspect --format '{{index .Labels "ctd.inputs"}}' "localhost/$tag" 2>/dev/null)" = "$digest" ]; then
    say "$tag is up to date (inputs $digest)"
    return
  fi
  args+=(--tag "$tag" --label "ctd.inputs=$digest")
  args+=(--build-arg "$base_arg=$BASE")
  local ca; ca="$(ca_bundle)"
  if [ -n "$ca" ]; then
    args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" -v "$PIPCONF:/etc/pip.conf:ro")
  fi
  if { [ "$target" = cpu ] || [ "$target" = guard ]; } && [ "$TORCH_INDEX" != "$TORCH_CPU_INDEX" ]; then
    args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX")
  fi
  say "building $tag from $dockerfile on $BASE"
  local t0=$SECONDS old
  old="$(podman image inspect --format '{{.Id}}' "localhost/$tag" 2>/dev/null || true)"
  podman build "${args[@]}" -f "$dockerfile" . >&2
  say "$tag built in $((SECONDS - t0)) s"
  # The image this build replaced (untagged now) would keep its GBs forever: drop it unless something uses it.
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "localhost/$tag")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
  # So would the untagged build stage (its venv is copied into the image): a disk that fills fails the next build.
  podman image prune --force >/dev/null 2>&1 || true
}

ensure_tools
ensure_conf
ensure_base
[ "$BOOTSTRAP_ONLY" -eq 1 ] && exit 0
BASE_ID="$(podman image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE")"

PIPCONF="$(mktemp)"
trap 'rm -f "$PIPCONF"' EXIT
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$PIPCONF"
chmod 644 "$PIPCONF"
# The CPU wheel index of torch; where only PyPI is reachable the PyPI wheel (CUDA libraries included) is used.
TORCH_INDEX="$TORCH_CPU_INDEX"
if ! curl -fsS -o /dev/null --max-time 15 "$TORCH_CPU_INDEX/torch/"; then
  TORCH_INDEX="https://pypi.org/simple"
  say "$TORCH_CPU_INDEX unreachable: torch comes from PyPI with its CUDA libraries (a larger CPU image)"
fi
for target in "${TARGETS[@]}"; do
  build "$target"
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '/ctd-(monitor|kafka|prometheus):'
