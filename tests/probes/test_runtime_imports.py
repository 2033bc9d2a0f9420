"""The runtime scorer and the budget controller do not load the training or plotting stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("sklearn", "scipy", "matplotlib", "typer")


@pytest.mark.parametrize("module", ["probes.runtime.monitor", "probes.runtime.stream_scorer", "probes.heads.token_probe",
                                    "probes.calibration.ltt", "probes.calibration.recalibration", "worker.budget"])
def test_runtime_module_imports_no_training_stack(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_the_check_can_fail() -> None:
    code = f"import sys, probes.fitting.heads; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "sklearn" in out.stdout
