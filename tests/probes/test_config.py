from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from probes.config import Settings, load_settings
from probes.errors import ConfigError


def test_defaults() -> None:
    s = load_settings()
    assert s.model.spec == "smollm2-135m-instruct" and s.features.pooling == "mean"
    assert s.expert.backend == "encoder-head"


def test_yaml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  spec: minilm-l6\n  dtype: fp32\nfeatures:\n  layer: 3\n")
    s = load_settings(path)
    assert (s.model.spec, s.model.dtype, s.features.layer) == ("minilm-l6", "fp32", 3)
    monkeypatch.setenv("CTD_MODEL__DTYPE", "bf16")
    s = load_settings(path)
    assert s.model.dtype == "bf16" and s.model.spec == "minilm-l6"


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[features]\npooling = "last"\n')
    assert load_settings(path).features.pooling == "last"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.model.spec = "x"  # type: ignore[misc]


@pytest.mark.parametrize("content", ["features:\n  pooling: median\n", "nonsense_key: 1\n"])
def test_invalid_config_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match="invalid configuration"):
        load_settings(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")
