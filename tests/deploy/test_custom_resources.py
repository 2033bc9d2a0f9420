"""Custom resources validate against the openAPIV3Schema of their CRDs (tests/deploy/fixtures/crds, see README)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import VARIANTS
from tests.deploy.helpers import FIXTURES, Doc, named

CRD_DIR = FIXTURES / "crds"


def strict(schema: Any) -> Any:
    """The CRD schema as JSON Schema that rejects unknown fields, like the API server's strict field validation.

    Objects that list ``properties`` get ``additionalProperties: false`` unless they preserve unknown fields;
    ``x-kubernetes-*`` markers are dropped (``int-or-string`` already comes with its ``anyOf``).
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:
        # The API server matches with Go's RE2, which takes inline flags anywhere; Python wants them first.
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) → strict JSON Schema, for every served version of every CRD fixture."""
    out: dict[tuple[str, str], Any] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                schema = strict(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(schema)
                out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return out


def errors(doc: Doc) -> list[str]:
    schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_fixtures_cover_the_custom_kinds() -> None:
    assert set(crd_schemas()) == {
        ("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_match_their_crds(renders: dict[str, list[Doc]], variant: str) -> None:
    custom = [d for d in renders[variant] if "." in str(d["apiVersion"]).split("/")[0]
              and not str(d["apiVersion"]).startswith(("apps/", "policy/", "networking.k8s.io/"))]
    assert {d["kind"] for d in custom} >= {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
    for doc in custom:
        assert (doc["apiVersion"], doc["kind"]) in crd_schemas(), f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
        problems = errors(doc)
        assert not problems, f"{doc['kind']}/{doc['metadata']['name']}: {problems}"


def test_crd_validation_rejects_broken_resources(renders: dict[str, list[Doc]]) -> None:
    """The schemas are not vacuous: a misspelt field, a wrong type and an out-of-range value are rejected."""
    docs = renders["gpu+components"]
    scaled = copy.deepcopy(named(docs, "ScaledObject", "ctd-worker"))
    scaled["spec"]["maxReplicas"] = 4
    monitor = copy.deepcopy(named(docs, "ServiceMonitor", "ctd-worker"))
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    rule = copy.deepcopy(named(docs, "PrometheusRule", "ctd-monitor"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    topic = copy.deepcopy(named(docs, "KafkaTopic", "conversations"))
    topic["spec"]["partitions"] = 0
    auth = copy.deepcopy(named(docs, "TriggerAuthentication", "ctd-kafka-auth"))
    del auth["spec"]["secretTargetRef"][0]["key"]
    for doc in (scaled, monitor, rule, topic, auth):
        assert errors(doc), f"{doc['kind']} should not validate"
