"""Rendering and lookup helpers for the deploy/ and docker/ checks (no cluster, no Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

Doc = dict[str, Any]


def tool(name: str) -> Path:
    """A binary from the project venv (scripts/setup.sh installs it from the dev extras), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in the venv or on PATH: run ./scripts/setup.sh (dev extras)")
    return Path(found)


def kustomize(path: Path) -> list[Doc]:
    """`kubectl kustomize PATH` parsed into documents."""
    proc = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def wrapper_kustomization(where: Path, overlay: str, components: list[str]) -> Path:
    """A kustomization in ``where`` that adds components to an overlay (kustomize wants relative paths)."""
    rel = Path(os.path.relpath(DEPLOY, where))
    body = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "ctd-monitor",
        "resources": [str(rel / "overlays" / overlay)],
        "components": [str(rel / "components" / c) for c in components],
    }
    where.mkdir(parents=True, exist_ok=True)
    (where / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return where


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def field_path(model: type[BaseModel], env_name: str, prefix: str = "CTD_") -> list[str] | None:
    """The settings field path an env name sets (CTD_KAFKA__SASL_PASSWORD → [kafka, sasl_password]), or None."""
    if not env_name.startswith(prefix):
        return None
    parts = env_name[len(prefix):].lower().split("__")
    current: Any = model
    for i, part in enumerate(parts):
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            current = annotation
    return parts


def exported_names(metrics: object) -> dict[str, frozenset[str]]:
    """Sample names a WorkerMetrics/GuardMetrics instance exports → the label names they carry.

    Counters export ``_total`` (and ``_created``), histograms ``_bucket``/``_sum``/``_count`` (``_bucket`` adds
    ``le``), gauges their own name. Labelled families export no sample until used, so the names come from the
    metric objects, not from a scrape.
    """
    out: dict[str, frozenset[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = frozenset(metric._labelnames)
        for family in metric.describe():
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                        "gauge": ("",)}[family.type]
            for suffix in suffixes:
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else frozenset())
    return out


PROMQL_KEYWORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
})
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\{[^}]*\})?(\s*\()?")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def promql_selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(metric name, {label: matched value}) for every vector selector of a PromQL expression."""
    masked = _GROUPING.sub(" ", _RANGE.sub(" ", expr))
    for m in _TOKEN.finditer(masked):
        name, braces, call = m.group(1), m.group(2), m.group(3)
        if (call and not braces) or name in PROMQL_KEYWORDS:
            continue
        labels: dict[str, str] = {}
        if braces:
            inner = braces.strip()[1:-1]
            consumed = 0
            for lm in _MATCHER.finditer(inner):
                assert lm.start() == consumed, f"unparsed label matchers in {inner!r}"
                labels[lm.group(1)] = lm.group(2)
                consumed = lm.end()
            assert inner[consumed:].strip() == "", f"unparsed label matchers in {inner!r}"
        yield name, labels


DASHBOARD = DEPLOY / "base" / "dashboards" / "ctd-monitor.json"


def dashboard_targets(dashboard: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every query of the Grafana dashboard, rows skipped."""
    import json

    out: list[tuple[str, str, str]] = []
    for panel in json.loads(dashboard.read_text())["panels"]:
        for target in panel.get("targets", ()):
            out.append((str(panel["title"]), str(target["refId"]), str(target["expr"])))
    return out
