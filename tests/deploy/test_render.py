"""The overlays render, and core kinds validate against the Kubernetes API schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
from collections import Counter

import kubernetes_validate
import pytest

from tests.deploy.conftest import VARIANTS
from tests.deploy.helpers import Doc, named, of_kind

KUBERNETES_VERSION = "1.30.0"  # oldest API level the manifests target (policy/v1, autoscaling/v2 era)
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "kafka.strimzi.io/")

BASE_KINDS = {
    "Deployment": 2, "Service": 2, "ConfigMap": 3, "PodDisruptionBudget": 2, "ScaledObject": 2,
    "ServiceMonitor": 2, "PrometheusRule": 1, "NetworkPolicy": 2,
}
COMPONENT_KINDS = {"KafkaTopic": 8, "TriggerAuthentication": 1}


def is_core(doc: Doc) -> bool:
    return not str(doc["apiVersion"]).startswith(CUSTOM_GROUPS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_expected_objects(renders: dict[str, list[Doc]], variant: str) -> None:
    kinds = Counter(d["kind"] for d in renders[variant])
    expected = dict(BASE_KINDS, **(COMPONENT_KINDS if variant.endswith("+components") else {}))
    assert dict(kinds) == expected
    for doc in renders[variant]:
        assert doc["metadata"].get("namespace") == "ctd-monitor", f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_kinds_validate_strictly(renders: dict[str, list[Doc]], variant: str) -> None:
    core = [d for d in renders[variant] if is_core(d)]
    assert core
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_core_validation_rejects_a_broken_deployment(renders: dict[str, list[Doc]]) -> None:
    """The validator is not vacuous: an unknown field and a mistyped port are both rejected."""
    worker = named(renders["gpu"], "Deployment", "ctd-worker")
    typo = copy.deepcopy(worker)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    badport = copy.deepcopy(worker)
    badport["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    for doc in (typo, badport):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_gpu_overlay_requests_one_gpu_and_tolerates_the_taint(renders: dict[str, list[Doc]]) -> None:
    for variant in ("gpu", "gpu+components"):
        pod = named(renders[variant], "Deployment", "ctd-worker")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        guard = named(renders[variant], "Deployment", "ctd-guard")["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(guard), "the guard service calls vLLM over HTTP: no GPU"
    for variant in ("cpu", "cpu+components"):
        assert "nvidia.com/gpu" not in str(of_kind(renders[variant], "Deployment"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned_and_containers_hardened(renders: dict[str, list[Doc]], variant: str) -> None:
    for dep in of_kind(renders[variant], "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        for c in pod["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
