"""Packed cached passes: the new tokens of several sequences in one row, each attending only to its own keys.

A stream's chunks are short and of uneven length. Padding them to the longest in a batch wastes part of every
pass. A block-causal mask over one packed row and one packed cache wastes the attention of each token to the
other sequences' keys instead, which on a CPU cost as much as the padding it saved (``bench stream``).
This module registers an attention function that transformers' decoders call per layer (``AttentionInterface``).
Without ``packed`` in the forward's keyword arguments it is SDPA, unchanged, and the masks are SDPA's. With it,
it splits the row into its sequences and runs each against its own past keys and values plus its new ones. It
also records those per sequence and layer: they are the sequences' extended caches, so the model runs with no
cache of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NAME = "ctd_packed_sdpa"

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Packed:
    """The sequences of one packed row: where each one's new tokens sit, its past (keys, values) per layer.

    ``caches[i][layer]`` is filled by the pass: sequence i's past and new keys and values for that layer.
    """

    starts: Sequence[int]
    lengths: Sequence[int]
    past: Sequence[Sequence[KV] | None]
    caches: list[dict[int, KV]] = field(init=False)
    #: Each sequence's mask, the same in every layer: built at the first one.
    masks: dict[int, torch.Tensor | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.caches = [{} for _ in self.lengths]

    def mask(self, i: int, past: int, device: torch.device) -> torch.Tensor | None:
        """Causal within the new tokens, everything of the past: row t sees keys 0 .. past + t (None: no past)."""
        if i not in self.masks:
            n = self.lengths[i]
            self.masks[i] = None if past == 0 else torch.ones((n, past + n), dtype=torch.bool, device=device).tril(past)
        return self.masks[i]


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                     packed: Packed | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one layer: SDPA, or per packed sequence when the forward carries ``packed``.

    query [1, heads, N, dim]; key, value [1, kv_heads, N, dim] (the new tokens only: no cache is passed).
    Returns [1, N, heads, dim], the layout transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = int(module.layer_idx)
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    for i, (start, n) in enumerate(zip(packed.starts, packed.lengths, strict=True)):
        k, v = key[:, :, start : start + n], value[:, :, start : start + n]
        past = packed.past[i]
        if past is not None:
            k = torch.cat([past[layer][0], k], dim=2)
            v = torch.cat([past[layer][1], v], dim=2)
        else:  # a fresh copy, so the sequence's cache does not keep the packed row alive
            k, v = k.clone(), v.clone()
        packed.caches[i][layer] = (k, v)
        mask = packed.mask(i, k.shape[2] - n, query.device)
        attended = F.scaled_dot_product_attention(
            query[:, :, start : start + n], k, v, attn_mask=mask, is_causal=mask is None and n > 1, scale=scaling,
            enable_gqa=gqa,
        )
        out[0, start : start + n] = attended[0].transpose(0, 1)
    return out, None


def install(model: Any) -> bool:
    """Route ``model``'s attention through ``packed_attention``; False when its attention is not plain SDPA.

    The switch only adds a path: calls without ``packed`` run SDPA with SDPA's masks, as before.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    # Each sequence attends to all of its keys here: a sliding window (Mistral, Qwen2, Gemma) would be ignored.
    if current != "sdpa" or getattr(config, "sliding_window", None) is not None:
        return False
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ValueError, NotImplementedError):  # a model that refuses: it keeps padded batches
        return False
    return getattr(config, "_attn_implementation", None) == NAME
