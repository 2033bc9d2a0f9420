"""Per-token hidden states *entering* one transformer block, cached per record (float16, bounded tokens).

What single-layer retraining trains on (probes/fitting/block_head.py): the monitored model run up to block
``block - 1`` once per record, so a retrained block ``block`` and its head can be fitted many times (one fit per
leave-source-out fold) without running the model again.

Storage: a namespace directory per (model, weights, block, max tokens, dtype the model ran in) under
``cache_dir/block_inputs``; each ``put`` writes one safetensors chunk atomically (keys, row offsets, states
concatenated over tokens), like ``probes.activations.record_cache``, whose key encoding it shares.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from probes.activations.models import LoadedModel
from probes.activations.record_cache import KEY_CHARS, decode_keys, encode_keys, namespace_key
from probes.cache import sha256_text
from probes.conversation import Conversation
from probes.logs import get_logger

log = get_logger(__name__)
F16 = npt.NDArray[np.float16]

#: float16 holds |x| <= 65504: a state beyond it would be stored as inf, so storing refuses it.
_F16_MAX = float(np.finfo(np.float16).max)


def block_input_namespace(loaded: LoadedModel, *, block: int, max_tokens: int) -> tuple[str, dict[str, str]]:
    """Everything but the record that changes the states entering ``block`` (1-based)."""
    parts = {"model": loaded.model_id, "weights_sha256": loaded.weights_sha256, "block": str(block),
             "max_tokens": str(max_tokens), "dtype": str(loaded.dtype).removeprefix("torch."), "stored": "float16"}
    return namespace_key("block_inputs", *parts.values()), parts


class BlockInputStore:
    """States [tokens, hidden] per record key in one namespace directory."""

    def __init__(self, root: Path, namespace: str, *, description: dict[str, str] | None = None):
        self.dir = root / "block_inputs" / namespace
        self.description = description or {}
        self._index: dict[str, F16] | None = None

    def _load(self) -> dict[str, F16]:
        if self._index is None:
            index: dict[str, F16] = {}
            for path in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
                try:
                    tensors = load_file(str(path))
                except (SafetensorError, OSError) as exc:  # a half-copied chunk: recompute its rows
                    log.warning("block_inputs.bad_chunk", path=str(path), error=str(exc))
                    continue
                offsets = tensors["offsets"]
                for row, key in enumerate(decode_keys(tensors["keys"])):
                    index[key] = tensors["states"][offsets[row] : offsets[row + 1]]
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def missing(self, keys: Sequence[str]) -> list[int]:
        index = self._load()
        return [i for i, k in enumerate(keys) if k[:KEY_CHARS] not in index]

    def get(self, keys: Sequence[str]) -> list[F16]:
        """The states of every key (KeyError for one never stored)."""
        index = self._load()
        return [index[k[:KEY_CHARS]] for k in keys]

    def put(self, keys: Sequence[str], states: Sequence[npt.ArrayLike]) -> None:
        if len(keys) != len(states):
            raise ValueError(f"need one state array per key: {len(states)} for {len(keys)} keys")
        if not keys:
            return
        arrays = [np.asarray(s, dtype=np.float32) for s in states]
        if any(a.ndim != 2 for a in arrays):
            raise ValueError("states must be [tokens, hidden] per record")
        peak = max(float(np.abs(a).max()) if a.size else 0.0 for a in arrays)
        if not np.isfinite(peak) or peak > _F16_MAX:
            raise ValueError(f"states reach {peak:g}, beyond float16's range: store them in a wider type")
        offsets = np.cumsum([0, *(len(a) for a in arrays)]).astype(np.int64)
        joined = np.ascontiguousarray(np.concatenate(arrays, axis=0).astype(np.float16))
        name = sha256_text(*keys)[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            save_file({"keys": encode_keys(keys), "offsets": offsets, "states": joined}, str(tmp),
                      metadata=self.description or None)
            os.replace(tmp, self.dir / f"{name}.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        index = self._load()
        for row, key in enumerate(keys):
            index[key[:KEY_CHARS]] = joined[offsets[row] : offsets[row + 1]]


def record_block_inputs(
    cache_dir: Path, loaded: LoadedModel, conversations: Sequence[Conversation], keys: Sequence[str], *,
    block: int, max_tokens: int, progress: Callable[[int], None] | None = None,
) -> tuple[list[F16], int]:
    """States entering ``block`` for every record, from the cache; only missing records run the model.

    ``loaded`` must run at least blocks 1..block-1 (``load_model(..., max_layer=block - 1)`` runs no more than
    needed); its tokenisation (chat template, truncation to ``max_tokens``) is the extractor's, so the states are
    those the probe layer sees in the yardstick. Returns (states per record, records computed).
    """
    from probes.activations.features import FeatureExtractor

    if not 2 <= block <= loaded.max_layer + 1:
        raise ValueError(f"block {block}: its input is the output of block {block - 1}, which the loaded model "
                         f"(blocks 1..{loaded.max_layer}) must run")
    namespace, meta = block_input_namespace(loaded, block=block, max_tokens=max_tokens)
    store = BlockInputStore(cache_dir, namespace, description=meta)
    seen: dict[str, int] = {}
    todo = [seen.setdefault(keys[i][:KEY_CHARS], i) for i in store.missing(keys) if keys[i][:KEY_CHARS] not in seen]
    if todo:
        extractor = FeatureExtractor(loaded, layer=block - 1, max_tokens=max_tokens, batch_tokens=8192,
                                     max_items=64)
        chunk = 64  # each chunk is stored when done: an interrupted run keeps its work
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            states = extractor.token_states([conversations[i] for i in part])
            store.put([keys[i] for i in part], states)
            if progress is not None:
                progress(len(part))
    return store.get(keys), len(todo)
