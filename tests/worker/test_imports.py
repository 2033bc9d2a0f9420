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
# The rooms of probes/ that are offline work: fitting heads, evaluating them. Bare names, so that a rewrite of
# module paths cannot turn them into something else.
OFFLINE_ROOMS = ("fitting", "evaluation")
# What the service runs: the worker and the probes/ rooms it reads (experts/ too: the guard builds one).
RUNTIME_DIRS = ("worker", "probes/runtime", "probes/heads", "probes/calibration", "probes/activations",
                "probes/experts")


def loaded_after_import(*modules: str) -> set[str]:
    code = f"import sys, json, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
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


def offline(modules: set[str]) -> set[str]:
    """Those of ``modules`` that live in an offline room of probes/."""
    rooms = {("probes", room) for room in OFFLINE_ROOMS}
    return {m for m in modules if tuple(m.split(".")[:2]) in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_modules() -> list[Path]:
    return sorted(p for d in RUNTIME_DIRS for p in (REPO / d).rglob("*.py"))


def test_the_service_loads_nothing_from_fitting_or_evaluation(loaded: dict[str, set[str]]) -> None:
    for entry, modules in loaded.items():
        assert not offline(modules), entry


def test_no_runtime_module_loads_fitting_or_evaluation() -> None:
    # Every module the service can reach, imported in one process: what the entries above load only later
    # (the guard's expert, the stream scorer) is covered too, and so are their imports at module level.
    names = [module_name(p) for p in runtime_modules() if p.name != "__main__.py"]
    assert "probes.runtime.stream_scorer" in names and "worker.monitor" in names, "the walk found the rooms"
    modules = loaded_after_import(*names)
    assert not offline(modules)
    assert not {m for m in modules if m.split(".")[0] in TRAINING_STACK}


def test_no_runtime_module_names_fitting_or_evaluation_even_lazily() -> None:
    # Imports inside functions run only when called; the source says what they would load.
    offenders = []
    for path in runtime_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     and node.module else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if offline({n})]
    assert not offenders


def test_the_room_check_can_fail() -> None:
    fitting = loaded_after_import("probes.fitting.dv")
    assert offline(fitting) == {"probes.fitting", "probes.fitting.dv"}  # codemod: keep (the package itself)
    assert offline({"probes.runtime.monitor", "probes.fittings", "probes", "worker.fitting"}) == set()


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
