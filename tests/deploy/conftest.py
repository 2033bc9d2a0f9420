"""Every deploy/ variant rendered once per session with `kubectl kustomize` (kubectl from the dev extras)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, Doc, kustomize, wrapper_kustomization

OVERLAYS = ("cpu", "gpu")
COMPONENTS = ["kafka-sasl", "strimzi-topics"]
VARIANTS = (*OVERLAYS, *(f"{o}+components" for o in OVERLAYS))


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """variant → rendered documents: each overlay alone, and each with every optional component."""
    out: dict[str, list[Doc]] = {}
    for overlay in OVERLAYS:
        out[overlay] = kustomize(DEPLOY / "overlays" / overlay)
        where: Path = tmp_path_factory.mktemp(f"{overlay}-components")
        out[f"{overlay}+components"] = kustomize(wrapper_kustomization(where, overlay, COMPONENTS))
    return out
