"""Fixtures of the container tests: the real broker and the small MiniLM bundle of tests/worker, an expert
directory, and the images built once per session with scripts/images.sh (skipped, with the reason, without
podman)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.activations.models import resolve_model_dir
from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.bundle import read_manifest, update_manifest
from tests.container.stack import build_images, podman, readable
from tests.worker import conftest as worker_fixtures

# The real broker and the small MiniLM bundle of tests/worker, shared with this directory.
kafka_broker = worker_fixtures.kafka_broker
small_bundle = worker_fixtures.small_bundle


@pytest.fixture(scope="session")
def expert_dir(small_expert: EncoderHeadExpert) -> Path:
    """The shared quick MiniLM encoder-head expert (tests/conftest.py), as the directory the guard container mounts."""
    return small_expert.model_dir


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if podman() is None:
        pytest.skip("podman not installed: the container tests need it (./scripts/images.sh installs it as root)")
    log = tmp_path_factory.mktemp("images") / "build.log"
    build_images("cpu", "guard", log=log)
    yield {"cpu": "localhost/ctd-monitor:cpu", "guard": "localhost/ctd-monitor:guard"}


MINILM_MOUNT = "/models/minilm"


@pytest.fixture(scope="session")
def mounted_bundle(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small MiniLM bundle for a container: the bundle decides which model runs, and the images bake only
    their default model, so this copy names the MiniLM weights by their mount point (a local Hugging Face
    directory, as deploy/ mounts any other model); the weights hash it pins is unchanged."""
    out = tmp_path_factory.mktemp("mounted") / "bundle"
    shutil.copytree(small_bundle, out)
    manifest = read_manifest(out)
    update_manifest(out, model=manifest.model.model_copy(update={"spec": MINILM_MOUNT}))
    readable(out)
    return out


@pytest.fixture(scope="session")
def mounted_expert(expert_dir: Path) -> Path:
    readable(expert_dir)
    return expert_dir


@pytest.fixture(scope="session")
def mounted_minilm(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MiniLM weights as a directory the container's user can read. A copy: the host's hash sidecars
    (``*.sha256.json``, written by root with its umask) are left behind, as on a fresh volume; the container
    hashes the weights itself (probes/cache.py cannot read a sidecar it is not allowed to)."""
    out = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(resolve_model_dir("minilm-l6", cache_dir), out, ignore=shutil.ignore_patterns("*.sha256.json"))
    readable(out)
    return out
