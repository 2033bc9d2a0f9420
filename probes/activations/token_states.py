"""Per-token hidden states of whole records on disk, keyed like the per-record vectors (``record_cache``).

Two readers: the token-level scorer (states of the probe layer) and single-layer retraining (states of the layer
below the retrained block, i.e. its inputs: probes/fitting/block_head.py).

A token-level scorer (issue 21: per-token probe + max of rolling means) trains on every token state of a
record, not on one pooled vector, so this stores a variable-length ``[T, D]`` array per record content key
inside a namespace that says how it was computed (model id + weights hash, layer, max tokens, dtype). States
are kept as float16 (half the bytes; a linear head's logit moves by ~1e-3 at most) and ``max_tokens`` bounds
each record, so the store stays a few hundred MB for a pool of ~2k records.

Storage is append-only like ``RecordStore``: each ``put`` writes one safetensors chunk (keys, row offsets, the
concatenated states) under a private name and renames it, so concurrent writers never see half a file.
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

from probes.activations.features import FeatureExtractor, Progress
from probes.activations.models import LoadedModel
from probes.activations.record_cache import KEY_CHARS, decode_keys, encode_keys, namespace_key
from probes.activations.render import common_prefix
from probes.cache import sha256_text
from probes.conversation import Conversation
from probes.logs import get_logger

log = get_logger(__name__)
F16 = npt.NDArray[np.float16]
STORED_DTYPE = "float16"
F16_MAX = float(np.finfo(np.float16).max)


def token_namespace(loaded: LoadedModel, *, layer: int, max_tokens: int) -> tuple[str, dict[str, str]]:
    """Everything but the record that changes its token states (and how they are stored)."""
    parts = {"model": loaded.model_id, "weights_sha256": loaded.weights_sha256, "layer": str(layer),
             "max_tokens": str(max_tokens), "dtype": str(loaded.dtype).removeprefix("torch."),
             "stored": STORED_DTYPE}
    return namespace_key("token-states", *parts.values()), parts


class TokenStateStore:
    """``[T, D]`` float16 states per record key in one namespace directory."""

    def __init__(self, root: Path, namespace: str, *, description: dict[str, str] | None = None):
        self.dir = root / "token-states" / namespace
        self.namespace = namespace
        self.description = description or {}
        self._index: dict[str, F16] | None = None

    def _load(self) -> dict[str, F16]:
        if self._index is None:
            index: dict[str, F16] = {}
            for path in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
                try:
                    tensors = load_file(str(path))
                except (SafetensorError, OSError) as exc:  # a damaged chunk: its records are recomputed
                    log.warning("token_states.bad_chunk", path=str(path), error=str(exc))
                    continue
                offsets, states = tensors["offsets"], tensors["states"]
                for i, key in enumerate(decode_keys(tensors["keys"])):
                    index[key] = states[int(offsets[i]) : int(offsets[i + 1])]
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions in ``keys`` with no stored states."""
        index = self._load()
        return [i for i, k in enumerate(keys) if k[:KEY_CHARS] not in index]

    def get(self, keys: Sequence[str]) -> list[F16 | None]:
        index = self._load()
        return [index.get(k[:KEY_CHARS]) for k in keys]

    def put(self, keys: Sequence[str], states: Sequence[npt.ArrayLike]) -> None:
        if len(keys) != len(states):
            raise ValueError(f"need one array per key: {len(states)} for {len(keys)} keys")
        if not keys:
            return
        wide = [np.asarray(s, dtype=np.float32) for s in states]
        if any(a.ndim != 2 for a in wide) or len({a.shape[1] for a in wide}) != 1:
            raise ValueError("every record needs a [tokens, dim] array of one width")
        peak = max(float(np.abs(a).max()) if a.size else 0.0 for a in wide)
        if not np.isfinite(peak) or peak > F16_MAX:  # stored as inf otherwise (block inputs reach ~25,000)
            raise ValueError(f"states reach {peak:g}, beyond float16's range: store them in a wider type")
        arrays = [a.astype(np.float16) for a in wide]
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
        flat = np.ascontiguousarray(np.concatenate(arrays, axis=0))
        name = sha256_text(*keys)[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            save_file({"keys": encode_keys(keys), "offsets": offsets, "states": flat}, str(tmp),
                      metadata=self.description or None)
            os.replace(tmp, self.dir / f"{name}.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        index = self._load()
        for i, key in enumerate(keys):
            index[key[:KEY_CHARS]] = flat[int(offsets[i]) : int(offsets[i + 1])]

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], Sequence[npt.ArrayLike]], *,
                       chunk: int = 64) -> tuple[list[F16], int]:
        """States for ``keys``; ``compute(positions)`` runs on the missing ones only, in chunks each stored when
        done (an interrupted run keeps its work). Returns (states in order, records computed)."""
        seen: set[str] = set()
        todo: list[int] = []
        for i in self.missing(keys):  # a key asked for twice is computed once
            if keys[i][:KEY_CHARS] not in seen:
                seen.add(keys[i][:KEY_CHARS])
                todo.append(i)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            self.put([keys[i] for i in part], compute(part))
        found = self.get(keys)
        if any(s is None for s in found):
            raise RuntimeError("token states missing after they were computed")
        return [s for s in found if s is not None], len(todo)


def template_prefix(extractor: FeatureExtractor) -> int:
    """Leading tokens every rendering shares (the chat template's system prompt and first role header).

    A causal model gives them the same states in every conversation, so a token-level scorer that reads them
    adds a constant to every conversation's candidates: a max over positions then ranks nothing when that constant
    is the highest. Measured as the common prefix of two conversations with different first words."""
    from probes.conversation import single_turn

    a, b = extractor.tokenize([single_turn("Hello there."), single_turn("Quietly, please.")])
    return common_prefix(a, b)


def record_token_states(cache_dir: Path, extractor: FeatureExtractor, conversations: Sequence[Conversation],
                        keys: Sequence[str], progress: Progress | None = None) -> tuple[list[F16], int]:
    """Per-token states of block ``extractor.layer`` for each conversation (rendered and cut to
    ``extractor.max_tokens`` as every other reader does), from the store; the model runs on missing records only.

    ``keys`` are the records' content hashes (``Record.content_key``). Returns (states, records computed).
    """
    namespace, meta = token_namespace(extractor.loaded, layer=extractor.layer, max_tokens=extractor.max_tokens)
    store = TokenStateStore(cache_dir, namespace, description=meta)

    def compute(rows: list[int]) -> list[F16]:
        out = [s.astype(np.float16) for s in extractor.token_states([conversations[i] for i in rows])]
        if progress is not None:
            progress(len(rows))
        return out

    return store.get_or_compute(keys, compute)
