"""Activation extraction: hidden states of one block, pooled (mean / last) or per token (EMA probes)."""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.numpy import load_file, save_file

from probes.activations import packed_attention
from probes.activations.batching import plan_batches
from probes.activations.models import LoadedModel, layer_stack
from probes.activations.render import BatchRenderer
from probes.cache import atomic_write_bytes, sha256_text
from probes.config import Pooling
from probes.conversation import Conversation
from probes.logs import get_logger

log = get_logger(__name__)

Progress = Callable[[int], None]
FloatArray = npt.NDArray[np.float32]


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens: padding never contributes."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token under right padding (index = number of real tokens - 1)."""
    last = mask.long().sum(dim=1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-dimension max over real tokens."""
    masked = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    return masked.max(dim=1).values


def pool_rolling_max(hidden: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Max over positions of the mean of ``window`` consecutive real tokens (a short harmful span inside a
    long benign text survives, where a plain mean dilutes it); texts shorter than the window get their mean."""
    lengths = mask.long().sum(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = torch.cumsum(hidden * weights, dim=1)
    summed = torch.cat([torch.zeros_like(summed[:, :1]), summed], dim=1)
    steps = hidden.shape[1]
    if steps < window:
        return pool_mean(hidden, mask)
    means = (summed[:, window:] - summed[:, :-window]) / window  # window ending at position t = window-1+i
    ends = torch.arange(window - 1, steps, device=hidden.device)
    valid = ends.unsqueeze(0) < lengths.unsqueeze(1)
    rolled = means.masked_fill(~valid.unsqueeze(-1), float("-inf")).max(dim=1).values
    short = (lengths < window).unsqueeze(-1)
    return torch.where(short, pool_mean(hidden, mask), rolled)


def rolling_window(pooling: str) -> int | None:
    """``rollmax8`` -> 8; None for the other poolings."""
    return int(pooling[len("rollmax"):]) if pooling.startswith("rollmax") else None


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "mean":
        return pool_mean(hidden, mask)
    if pooling == "last":
        return pool_last(hidden, mask)
    if pooling == "max":
        return pool_max(hidden, mask)
    window = rolling_window(pooling)
    if window is None:
        raise ValueError(f"unknown pooling {pooling!r}")
    return pool_rolling_max(hidden, mask, window)


KV = tuple[torch.Tensor, torch.Tensor]


def _cache_layers(cache: Any) -> list[KV]:
    """(keys, values) per block, each [batch, heads, tokens, dim]: transformers' DynamicCache or legacy tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if isinstance(cache, tuple | list):
        return [(k, v) for k, v, *_ in cache]
    raise TypeError(f"unsupported KV cache {type(cache).__name__}")


def _cache_length(cache: Any) -> int:
    return int(_cache_layers(cache)[0][0].shape[2])


def _new_cache(layers: Sequence[KV]) -> Any:
    """A DynamicCache holding copies of ``layers`` (its layers concatenate onto empty tensors)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers))


def _adopt_cache(layers: Sequence[KV]) -> Any:
    """A DynamicCache holding ``layers`` themselves: for tensors the caller made fresh and hands over."""
    cache = _new_cache([(k[:, :, :0], v[:, :, :0]) for k, v in layers])  # copies nothing: empty slices
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = k, v
    return cache


def crop_cache(cache: Any, length: int) -> Any:
    """The cache of the first ``length`` tokens, as views of ``cache`` (which stays as it is)."""
    return _adopt_cache([(k[:, :, :length], v[:, :, :length]) for k, v in _cache_layers(cache)])


def _stack_caches(caches: Sequence[Any | None], lengths: Sequence[int], width: int, device: torch.device) -> Any:
    """One batch cache: item i's keys/values right-aligned at ``width`` (zeros before them, hidden by the mask)."""
    per_item = [None if c is None else _cache_layers(c) for c in caches]
    reference = next(layers for layers in per_item if layers is not None)
    stacked = []
    for layer, (k0, v0) in enumerate(reference):
        keys = k0.new_zeros((len(caches), k0.shape[1], width, k0.shape[3]), device=device)
        values = v0.new_zeros((len(caches), v0.shape[1], width, v0.shape[3]), device=device)
        for row, (own, n) in enumerate(zip(per_item, lengths, strict=True)):
            if own is not None and n:
                k, v = own[layer]
                keys[row, :, width - n :] = k[0]
                values[row, :, width - n :] = v[0]
        stacked.append((keys, values))
    return _new_cache(stacked)


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded ids of a batch and the positions of its items in the caller's list."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(ids: Sequence[Sequence[int]], indices: list[int], pad_id: int) -> TokenBatch:
    # Filled in numpy and handed to torch without a copy: a torch slice assignment per row costs more than
    # the rest of the worker's per-event bookkeeping.
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.arange(width) < lengths[:, None]
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return TokenBatch(indices=indices, input_ids=torch.from_numpy(input_ids),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)))


class FeatureExtractor:
    """Runs the truncated model and captures the output of block ``layer`` with a forward hook.

    A hook rather than ``output_hidden_states`` because the last stored hidden state of a decoder is
    post-norm, so the same layer number would mean different things depending on truncation.
    """

    def __init__(self, loaded: LoadedModel, *, layer: int, max_tokens: int, batch_tokens: int, max_items: int):
        if not 1 <= layer <= loaded.max_layer:
            raise ValueError(f"layer {layer} not in the loaded blocks 1..{loaded.max_layer}")
        self.loaded = loaded
        self.layer = layer
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.max_items = max_items
        self._captured: torch.Tensor | None = None
        self.renderer = BatchRenderer(loaded.tokenizer, max_tokens)
        # The hook writes shared state: one forward at a time per extractor, whichever thread calls it.
        self._lock = threading.Lock()
        self._packed: bool | None = None  # whether cached batches run packed: known at the first one
        layer_stack(loaded.model)[layer - 1].register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    @property
    def pad_id(self) -> int:
        return int(self.loaded.tokenizer.pad_token_id)

    def tokenize(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        return self.renderer.ids(conversations)

    def batches(self, ids: Sequence[Sequence[int]]) -> Iterator[TokenBatch]:
        plan = plan_batches([len(x) for x in ids], batch_tokens=self.batch_tokens, max_items=self.max_items)
        for indices in plan:
            yield collate([ids[i] for i in indices], indices, self.pad_id)

    @torch.inference_mode()
    def hidden(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, T, D] (float32, on the model's device) and the attention mask [B, T]."""
        device = self.loaded.device
        non_blocking = device.type == "cuda"
        input_ids = batch.input_ids.to(device, non_blocking=non_blocking)
        mask = batch.attention_mask.to(device, non_blocking=non_blocking)
        with self._lock:
            self._captured = None
            self.loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the forward hook captured nothing")
        return captured.float(), mask

    @torch.inference_mode()
    def hidden_cached(self, input_ids: Sequence[int], past: Any | None = None) -> tuple[torch.Tensor, Any]:
        """One sequence continued from ``past`` (the KV cache of its earlier tokens, None = from scratch).

        Returns the captured states [T, D] (float32) of ``input_ids`` only, and the cache extended by them:
        a causal decoder gives the same states as running the whole sequence at once.
        """
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.loaded.device)
        # transformers 5.x renamed past_key_values to cache (the old name warns); older versions only know it.
        name = "cache" if "cache" in inspect.signature(self.loaded.model.forward).parameters else "past_key_values"
        with self._lock:
            self._captured = None
            out = self.loaded.model(input_ids=ids, use_cache=True, **{name: past})
            captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the forward hook captured nothing")
        return captured[0].float(), out[name]

    @torch.inference_mode()
    def hidden_cached_batch(
        self, items: Sequence[tuple[Sequence[int], Any | None]]
    ) -> list[tuple[torch.Tensor, Any]]:
        """Several sequences, each continued from its own cache (or None), in one forward pass.

        What ``hidden_cached`` gives for each item alone (same states within float tolerance, caches of the same
        tokens). Where the model's attention is SDPA, the items are packed (``probes.activations.packed_attention``): their
        new ids back to back in one row, each attending only to its own cache and earlier new tokens, so no
        token is padded. Elsewhere the caches are left-padded to the longest and stacked, the new ids
        right-padded, and the attention mask hides both paddings. Either way the position ids continue each
        item's own sequence, so each is rotated as in its unbatched run. The given caches are read, never
        changed (a failed pass leaves them usable); each returned cache is fresh.
        """
        if not items:
            return []
        if any(not ids for ids, _ in items):
            raise ValueError("every item needs at least one new token")
        if len(items) == 1:  # nothing to pad; a copy of the cache is continued, not the caller's
            (ids, past), = items
            return [self.hidden_cached(ids, None if past is None else _new_cache(_cache_layers(past)))]
        if self.packs_cached_batches():
            packed = self._hidden_packed(items)
            if packed is not None:
                return packed
            # The model ran without the packed attention (its forward did not hand it down): never again.
            log.warning("features.packing_disabled", model=self.loaded.model_id)
            self._packed = False
        device = self.loaded.device
        past_len = [0 if past is None else _cache_length(past) for _, past in items]
        new_len = [len(ids) for ids, _ in items]
        width, span = max(past_len), max(new_len)
        batch = len(items)
        input_ids = torch.full((batch, span), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width + span), dtype=torch.long)
        positions = torch.empty((batch, span), dtype=torch.long)
        for row, ((ids, _), p, n) in enumerate(zip(items, past_len, new_len, strict=True)):
            input_ids[row, :n] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - p : width + n] = 1
            # Padded slots continue the count too: their outputs are dropped, their positions only need to exist.
            positions[row] = torch.arange(p, p + span)
        stacked = _stack_caches([past for _, past in items], past_len, width, device) if width else None
        name = "cache" if "cache" in inspect.signature(self.loaded.model.forward).parameters else "past_key_values"
        with self._lock:
            self._captured = None
            out = self.loaded.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=True, **{name: stacked})
            captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the forward hook captured nothing")
        hidden = captured.float()
        layers = _cache_layers(out[name])
        results: list[tuple[torch.Tensor, Any]] = []
        for row, (p, n) in enumerate(zip(past_len, new_len, strict=True)):
            # The row's real tokens are contiguous (cache right-aligned at ``width``, new ones from it); the new
            # cache copies them, so it does not keep the whole padded batch alive in the store.
            own = [(k[row : row + 1, :, width - p : width + n], v[row : row + 1, :, width - p : width + n])
                   for k, v in layers]
            results.append((hidden[row, :n], _new_cache(own)))
        return results

    def packs_cached_batches(self) -> bool:
        """Whether ``hidden_cached_batch`` packs its items in one row (SDPA models) rather than padding them."""
        if self._packed is None:
            with self._lock:
                self._packed = packed_attention.install(self.loaded.model)
        return self._packed

    def _hidden_packed(
        self, items: Sequence[tuple[Sequence[int], Any | None]]
    ) -> list[tuple[torch.Tensor, Any]] | None:
        """The packed pass; None when the model's layers did not all run the packed attention (nothing to use)."""
        device = self.loaded.device
        lengths = [len(ids) for ids, _ in items]
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        past_len = [0 if cache is None else _cache_length(cache) for _, cache in items]
        past = [None if cache is None else [(k.to(device), v.to(device)) for k, v in _cache_layers(cache)]
                for _, cache in items]
        input_ids = torch.tensor([list(itertools.chain.from_iterable(ids for ids, _ in items))], dtype=torch.long)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(past_len, lengths, strict=True)])[None]
        packed = packed_attention.Packed(starts=starts, lengths=lengths, past=past)
        with self._lock:
            self._captured = None
            self.loaded.model(input_ids=input_ids.to(device), position_ids=positions.to(device), use_cache=False,
                              packed=packed)
            captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the forward hook captured nothing")
        blocks = len(layer_stack(self.loaded.model))
        if any(len(layers) != blocks for layers in packed.caches):
            return None
        hidden = captured[0].float()
        return [(hidden[start : start + n], _adopt_cache([layers[i] for i in range(blocks)]))
                for start, n, layers in zip(starts, lengths, packed.caches, strict=True)]

    def pooled_batch(self, batch: TokenBatch, pooling: Pooling) -> FloatArray:
        hidden, mask = self.hidden(batch)
        return pool(hidden, mask, pooling).cpu().numpy().astype(np.float32)

    def pooled(
        self, conversations: Sequence[Conversation], pooling: Pooling, progress: Progress | None = None
    ) -> FloatArray:
        ids = self.tokenize(conversations)
        out = np.zeros((len(ids), self.loaded.hidden_size), dtype=np.float32)
        for batch in self.batches(ids):
            out[batch.indices] = self.pooled_batch(batch, pooling)
            if progress is not None:
                progress(len(batch.indices))
        return out

    def token_states(self, conversations: Sequence[Conversation]) -> list[FloatArray]:
        """Per-token hidden states of each conversation (real tokens only), for streamed/EMA scoring."""
        ids = self.tokenize(conversations)
        out: list[FloatArray] = [np.zeros((0, 0), dtype=np.float32)] * len(ids)
        for batch in self.batches(ids):
            hidden, mask = self.hidden(batch)
            lengths = mask.sum(dim=1).tolist()
            for row, index in enumerate(batch.indices):
                out[index] = hidden[row, : int(lengths[row])].cpu().numpy().astype(np.float32)
        return out


def ema_scores(token_logits: npt.ArrayLike, decay: float) -> npt.NDArray[np.float64]:
    """s_t = λ·s_{t−1} + (1−λ)·z_t with s_0 = z_0 (one scalar of state per stream, docs/method.md §7)."""
    z = np.asarray(token_logits, dtype=np.float64)
    out = np.empty_like(z)
    state = 0.0
    for t, value in enumerate(z):
        state = value if t == 0 else decay * state + (1.0 - decay) * value
        out[t] = state
    return out


class FeatureCache:
    """Pooled features on disk, keyed by everything that changes them, so reruns are instant."""

    def __init__(self, cache_dir: Path):
        self.root = cache_dir / "features"

    @staticmethod
    def key(
        loaded: LoadedModel, *, layer: int, pooling: Pooling, max_tokens: int, data_hash: str, dtype: str
    ) -> str:
        return sha256_text(
            loaded.model_id, loaded.weights_sha256, str(layer), pooling, str(max_tokens), data_hash, dtype, "v1"
        )[:32]

    def get(self, key: str) -> FloatArray | None:
        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        return load_file(str(path))["features"]

    def put(self, key: str, features: FloatArray, metadata: dict[str, str]) -> Path:
        path = self.root / f"{key}.safetensors"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": np.ascontiguousarray(features)}, str(tmp), metadata=metadata)
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink(missing_ok=True)
        return path


FeatureVariant = tuple[int, str]  # (layer, pooling)


class MultiLayerExtractor:
    """One forward pass, several blocks and poolings: every (layer, pooling) variant of a text at once.

    Composes a ``FeatureExtractor`` on the highest layer (its tokenisation, batching, lock and hook) and
    hooks the lower blocks beside it, so a layer/pooling sweep costs one extraction, not one per variant.
    """

    def __init__(self, loaded: LoadedModel, *, layers: Sequence[int], max_tokens: int, batch_tokens: int,
                 max_items: int):
        if not layers:
            raise ValueError("need at least one layer")
        self.layers = sorted(set(layers))
        self.base = FeatureExtractor(loaded, layer=self.layers[-1], max_tokens=max_tokens,
                                     batch_tokens=batch_tokens, max_items=max_items)
        self._captured: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()  # the lower hooks write shared state too (base.hidden has its own lock)
        stack = layer_stack(loaded.model)
        for layer in self.layers[:-1]:
            stack[layer - 1].register_forward_hook(self._hook(layer))

    def _hook(self, layer: int) -> Callable[[Any, Any, Any], None]:
        def capture(module: Any, inputs: Any, output: Any) -> None:
            self._captured[layer] = output[0] if isinstance(output, tuple) else output

        return capture

    def pooled(
        self, conversations: Sequence[Conversation], variants: Sequence[FeatureVariant],
        progress: Progress | None = None,
    ) -> dict[FeatureVariant, FloatArray]:
        unknown = [v for v in variants if v[0] not in self.layers]
        if unknown:
            raise ValueError(f"variants {unknown} use layers this extractor does not hook ({self.layers})")
        ids = self.base.tokenize(conversations)
        size = self.base.loaded.hidden_size
        out = {v: np.zeros((len(ids), size), dtype=np.float32) for v in variants}
        for batch in self.base.batches(ids):
            with self._lock:
                self._captured = {}
                top, mask = self.base.hidden(batch)
                captured = {**self._captured, self.layers[-1]: top}
                self._captured = {}
            for layer, pooling in variants:
                pooled = pool(captured[layer].float(), mask, pooling)  # type: ignore[arg-type]
                out[(layer, pooling)][batch.indices] = pooled.cpu().numpy().astype(np.float32)
            if progress is not None:
                progress(len(batch.indices))
        return out


def feature_namespace(loaded: LoadedModel, *, layer: int, pooling: str, max_tokens: int) -> tuple[str, dict[str, str]]:
    """The record-store namespace of one feature variant: everything but the record that changes a vector."""
    from probes.activations.record_cache import namespace_key

    parts = {"model": loaded.model_id, "weights_sha256": loaded.weights_sha256, "layer": str(layer),
             "pooling": pooling, "max_tokens": str(max_tokens), "dtype": str(loaded.dtype).removeprefix("torch.")}
    return namespace_key("features", *parts.values()), parts


def record_features(
    cache_dir: Path, extractor: MultiLayerExtractor, conversations: Sequence[Conversation], keys: Sequence[str],
    variants: Sequence[FeatureVariant], progress: Progress | None = None,
) -> tuple[dict[FeatureVariant, FloatArray], int]:
    """Features of every variant from the per-record cache; only records missing in some variant run the model.

    ``keys`` are the records' content hashes (``Record.content_key``). Returns (features, records computed).
    """
    from probes.activations.record_cache import RecordStore

    base = extractor.base
    stores = {}
    for layer, pooling in variants:
        namespace, meta = feature_namespace(base.loaded, layer=layer, pooling=pooling, max_tokens=base.max_tokens)
        stores[(layer, pooling)] = RecordStore(cache_dir, namespace, description=meta)
    dim = base.loaded.hidden_size
    lookups = {v: store.get(keys, dim) for v, store in stores.items()}
    todo = sorted({i for lookup in lookups.values() for i in lookup.missing})
    seen: dict[str, int] = {}
    unique = [seen.setdefault(keys[i][:32], i) for i in todo if keys[i][:32] not in seen]
    chunk = 64  # each chunk is stored when done: an interrupted run keeps its work
    for start in range(0, len(unique), chunk):
        part = unique[start : start + chunk]
        computed = extractor.pooled([conversations[i] for i in part], variants, progress)
        for v, store in stores.items():
            store.put([keys[i] for i in part], computed[v])
    if not unique:
        return {v: lookup.values for v, lookup in lookups.items()}, 0
    return {v: store.rows(keys, dim).values for v, store in stores.items()}, len(unique)
