"""The shipped service imports neither development tooling nor the training stack."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRIES = ("worker.main", "worker.__main__")
TOOLING = ("typer", "matplotlib", "ctd_monitor", "ctd_monitor.local", "ctd_monitor.bench")
# Not rich: structlog itself imports it for console tracebacks wherever it is installed (typer brings it here).
TRAINING_STACK = ("sklearn", "scipy")


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, check=True)
    return set(json.loads(done.stdout))


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    return {entry: loaded_after_import(entry) for entry in ENTRIES}


def test_the_service_does_not_import_development_tooling(loaded: dict[str, set[str]]) -> None:
    for entry, modules in loaded.items():
        assert "worker.stream" in modules or entry == "worker.__main__", "the check saw the service's imports"
        assert not {m for m in modules if m.split(".")[0] in TOOLING or m in TOOLING}, entry


def test_the_service_does_not_import_the_training_stack(loaded: dict[str, set[str]]) -> None:
    for entry, modules in loaded.items():
        assert not {m for m in modules if m.split(".")[0] in TRAINING_STACK}, entry


def test_no_worker_module_imports_ctd_monitor() -> None:
    offenders = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "ctd_monitor"]
    assert not offenders


def test_the_service_entry_runs_without_the_cli() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0 and "run" in done.stdout and "expert" in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, "-m", "worker", "--config", str(REPO / "missing.yaml"), "run"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert bad.returncode == 2 and "config file not found" in bad.stderr
