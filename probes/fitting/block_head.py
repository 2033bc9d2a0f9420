"""Single-layer retraining (docs/method.md §7b): one transformer block of the monitored model, fine-tuned together
with the mean-pool + logistic head on the cached states entering it (probes/activations/token_states.py: the
states of the layer below).

The block is a copy of the model's own module with its pretrained weights; its attention mask and rotary
position embeddings come from the model's own ``create_causal_mask`` and ``rotary_emb``, so the frozen copy
reproduces the monitored model's states exactly (tests/probes/test_block_head.py). Training starts from the
linear probe (the logistic head fitted on the frozen block's pooled states, as ``fit_logistic`` fits it) and moves
block and head together with AdamW on the recipe's weighted BCE: at step 0 the block head *is* the linear probe.
Training only; the runtime never imports this module.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import nn

from probes.activations.models import LoadedModel, layer_stack, load_model
from probes.config import Frozen
from probes.errors import ModelSpecError
from probes.heads.inference import LinearHead
from probes.logs import get_logger

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


class BlockTraining(Frozen):
    """How the block and its head are fine-tuned (fixed before any measurement, not tuned on held-out groups)."""

    epochs: int = Field(1, ge=0, description="passes over the fit rows (0: the linear probe on the frozen block)")
    batch_size: int = Field(16, ge=1)
    train_tokens: int = Field(
        64, ge=1, description="each record's first N tokens in training (a causal block's states of a prefix are "
        "those of the record cut there); scoring reads every cached token")
    block_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the block (pretrained: small)")
    head_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the logistic head")
    c: float = Field(0.5, gt=0, description="inverse L2 strength of the head, as the linear probe's")
    seed: int = 0


class BlockRunner(nn.Module):
    """A block of the monitored model on cached inputs: its own module, causal mask and rotary embedding."""

    def __init__(self, block: nn.Module, rotary: nn.Module, config: Any):
        super().__init__()
        self.block = block
        self.rotary = rotary
        self.config = config

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [B, T, D] right-padded, mask [B, T] (1 = real token) -> the block's output [B, T, D]."""
        from transformers.masking_utils import create_causal_mask

        batch, steps = mask.shape
        positions = torch.arange(steps, device=states.device).unsqueeze(0).expand(batch, steps)
        causal = create_causal_mask(config=self.config, inputs_embeds=states, attention_mask=mask, cache=None,
                                    position_ids=positions)
        embeddings = self.rotary(states, position_ids=positions)
        out = self.block(states, attention_mask=causal, position_ids=positions, position_embeddings=embeddings)
        hidden: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return hidden


def block_runner(loaded: LoadedModel, block: int) -> BlockRunner:
    """A trainable float32 copy of block ``block`` (1-based) of a loaded model, with its rotary embedding."""
    blocks = layer_stack(loaded.model)
    if not 1 <= block <= len(blocks):
        raise ValueError(f"block {block} not in the loaded blocks 1..{len(blocks)}")
    rotary = getattr(loaded.model, "rotary_emb", None)
    if rotary is None:
        raise ModelSpecError(f"{loaded.model_id} has no rotary_emb: single-layer retraining needs a RoPE decoder")
    source = blocks[block - 1]
    # A fresh module of the block's own class holding its weights: a deepcopy would also copy the forward hooks
    # extractors put on the loaded model (and their locks). HF decoder blocks are built from (config, layer_idx).
    fresh = type(source)(loaded.model.config, block - 1)
    fresh.load_state_dict(source.state_dict())
    return BlockRunner(fresh.float(), copy.deepcopy(rotary).float(), loaded.model.config)


def load_block_runner(spec: str, *, cache_dir: Path, block: int) -> BlockRunner:
    """The pretrained block ``block`` of a model spec (the model is loaded up to it, in float32)."""
    return block_runner(load_model(spec, cache_dir=cache_dir, dtype="fp32", max_layer=block), block)


def _pad(states: Sequence[npt.NDArray[Any]], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = [np.asarray(s)[:limit] for s in states]
    steps = max(1, max(len(a) for a in arrays))
    dim = arrays[0].shape[1]
    out = torch.zeros((len(arrays), steps, dim), dtype=torch.float32)
    mask = torch.zeros((len(arrays), steps), dtype=torch.long)
    for row, a in enumerate(arrays):
        if len(a):
            out[row, : len(a)] = torch.from_numpy(a.astype(np.float32))
            mask[row, : len(a)] = 1
    return out, mask


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from probes.activations.features import pool_mean

    return pool_mean(hidden, mask)


def _batches(lengths: Sequence[int], size: int, order: npt.NDArray[np.int64]) -> list[list[int]]:
    """Batches of ``order`` with similar lengths (less padding), each batch's rows in ``order``'s sequence."""
    chunks = [order[i : i + size * 8] for i in range(0, len(order), size * 8)]
    out: list[list[int]] = []
    for chunk in chunks:
        ranked = sorted(chunk.tolist(), key=lambda i: lengths[i])
        out.extend(ranked[i : i + size] for i in range(0, len(ranked), size))
    return out


@torch.no_grad()
def pooled_states(runner: BlockRunner, states: Sequence[npt.NDArray[Any]], *, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None) -> F32:
    """The block's output, mean-pooled over each record's real tokens: [records, hidden]."""
    runner.eval()
    lengths = [len(s) for s in states]
    dim = int(runner.config.hidden_size)
    out = np.zeros((len(states), dim), dtype=np.float32)
    for rows in _batches(lengths, batch_size, np.arange(len(states), dtype=np.int64)):
        x, mask = _pad([states[i] for i in rows], None)
        out[rows] = _mean_pool(runner(x, mask), mask).numpy()
        if progress is not None:
            progress(len(rows))
    return out


@dataclass
class BlockHead:
    """A retrained block and the logistic head on its mean-pooled output."""

    runner: BlockRunner
    head: LinearHead
    block: int
    losses: list[float]  # mean weighted BCE per epoch

    def proba(self, states: Sequence[npt.NDArray[Any]], *, batch_size: int = 32) -> F64:
        return self.head.proba(pooled_states(self.runner, states, batch_size=batch_size)).astype(np.float64)

    def block_state(self) -> dict[str, torch.Tensor]:
        """The retrained block's weights, named as in the model's block module."""
        return {k: v.detach().clone() for k, v in self.runner.block.state_dict().items()}


def fit_block_head(
    runner: BlockRunner, states: Sequence[npt.NDArray[Any]], labels: npt.ArrayLike, weights: npt.ArrayLike, *,
    block: int, training: BlockTraining | None = None, frozen_pooled: F32 | None = None,
) -> BlockHead:
    """Fine-tune a copy of ``runner``'s block and a logistic head on the fit rows (``runner`` stays as it was).

    ``frozen_pooled``: the frozen block's pooled states of these rows, when the caller has them already (the
    initial head is fitted on them).
    """
    from sklearn.exceptions import ConvergenceWarning

    from probes.fitting.heads import fit_logistic

    training = training or BlockTraining()
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    pooled = pooled_states(runner, states) if frozen_pooled is None else frozen_pooled
    with warnings.catch_warnings():
        # the yardstick's linear probe stops at 200 lbfgs iterations too (scoring.HEAD_MAX_ITER)
        warnings.simplefilter("ignore", ConvergenceWarning)
        initial = fit_logistic(pooled, y, c=training.c, seed=training.seed, sample_weight=w, max_iter=200)
    model = copy.deepcopy(runner)
    model.train()
    torch.manual_seed(training.seed)
    mean = torch.from_numpy(initial.mean.astype(np.float32))
    scale = torch.from_numpy(initial.scale.astype(np.float32))
    head_w = nn.Parameter(torch.from_numpy(initial.weight.astype(np.float32)))
    head_b = nn.Parameter(torch.tensor(float(initial.bias)))
    optimiser = torch.optim.AdamW([
        # weight decay would pull the pretrained block toward zero, not toward where it started
        {"params": list(model.block.parameters()), "lr": training.block_lr, "weight_decay": 0.0},
        {"params": [head_w, head_b], "lr": training.head_lr, "weight_decay": 0.0},
    ])
    for p in model.rotary.parameters():
        p.requires_grad_(False)
    target = torch.from_numpy(y.astype(np.float32))
    row_w = torch.from_numpy(w.astype(np.float32))
    lengths = [min(len(s), training.train_tokens) for s in states]
    rng = np.random.default_rng(training.seed)
    # sklearn's objective C * sum(w * bce) + |w|^2 / 2, per row: the same ridge as the linear probe
    ridge = 1.0 / (2.0 * training.c * max(1.0, float(w.sum())))
    losses: list[float] = []
    for _ in range(training.epochs):
        total, seen = 0.0, 0.0
        for rows in _batches(lengths, training.batch_size, rng.permutation(len(y)).astype(np.int64)):
            x, mask = _pad([states[i] for i in rows], training.train_tokens)
            logits = ((_mean_pool(model(x, mask), mask) - mean) / scale) @ head_w + head_b
            bce = nn.functional.binary_cross_entropy_with_logits(logits, target[rows], reduction="none")
            loss = (bce * row_w[rows]).sum() / row_w[rows].sum() + ridge * (head_w**2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float((bce * row_w[rows]).detach().sum())
            seen += float(row_w[rows].sum())
        losses.append(total / max(seen, 1e-12))
        log.info("block_head.epoch", epoch=len(losses), loss=round(losses[-1], 4))
    model.eval()
    head = LinearHead(mean=initial.mean, scale=initial.scale, weight=head_w.detach().numpy().copy(),
                      bias=float(head_b.detach()))
    return BlockHead(runner=model, head=head, block=block, losses=losses)


def block_flops_per_token(config: Any, *, context: float) -> float:
    """Forward FLOPs of one block per token (multiply-add = 2), from the model config's shapes.

    Projections q, k, v, o and the gated MLP (gate, up, down), plus attention scores and the weighted sum over
    ``context`` attended tokens (a causal record of n tokens attends (n + 1) / 2 on average); norms and the
    activation are O(hidden) and left out.
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", heads))
    inner = int(config.intermediate_size)
    projections = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inner
    return 2.0 * (projections + mlp) + 4.0 * context * heads * head_dim
