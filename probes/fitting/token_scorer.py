"""Fit the token-level conversation scorer (``probes.heads.token_scorer``) on sequence labels.

Offline only (torch). A linear head on standardised token states; two objectives, chosen under leave-source-out
(``probes.evaluation.generalization.token_scorer``), never on a random split:

- ``maxmean``: the aggregated score itself is trained. s_i = max_t m_it, m_it the mean of the last ``window``
  token logits of sequence i; the max is relaxed to a softmax-weighted mean of the m_it with a temperature
  annealed from ``tau_start`` to ``tau_end`` (early on every window learns, at the end only the highest one,
  which is what the runtime reads); weighted logistic loss on s_i and the sequence label.
- ``broadcast``: every token carries its sequence's label (the response token probe's recipe,
  ``probes.fitting.token_train``); each sequence weighs its own weight however many tokens it has.

Both: full-batch Adam, L2 ``l2`` on the standardised weights, the sequence weights normalised to mean 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from probes.heads.inference import LinearHead
from probes.heads.token_scorer import TokenScorer

Objective = Literal["maxmean", "broadcast"]
OBJECTIVES: tuple[Objective, ...] = ("maxmean", "broadcast")


@dataclass(frozen=True)
class TokenScorerFit:
    """Settings of one fit."""

    objective: Objective = "maxmean"
    window: int = 16
    l2: float = 1e-3
    epochs: int = 200
    lr: float = 0.02
    tau_start: float = 2.0
    tau_end: float = 0.05
    seed: int = 0


def token_standardisation(sequences: Sequence[npt.ArrayLike]) -> tuple[npt.NDArray[np.float32],
                                                                        npt.NDArray[np.float32]]:
    """Mean and scale of the token states, each sequence weighing alike (a long conversation does not set them)."""
    means = np.stack([np.asarray(s, dtype=np.float64).mean(axis=0) for s in sequences])
    squares = np.stack([(np.asarray(s, dtype=np.float64) ** 2).mean(axis=0) for s in sequences])
    mean = means.mean(axis=0)
    scale = np.sqrt(np.maximum(squares.mean(axis=0) - mean**2, 0.0))
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


@dataclass
class _Packed:
    flat: torch.Tensor  # [sum T, D] standardised states
    index: torch.Tensor  # [N, Tmax] position in flat (0 where padded)
    mask: torch.Tensor  # [N, Tmax] bool


def _pack(sequences: Sequence[npt.ArrayLike], mean: npt.NDArray[np.float32],
          scale: npt.NDArray[np.float32]) -> _Packed:
    lengths = [int(np.asarray(s).shape[0]) for s in sequences]
    flat = np.concatenate([np.asarray(s, dtype=np.float32) for s in sequences], axis=0)
    flat = (flat - mean) / scale
    width = max(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(width)
    mask = positions[None, :] < np.asarray(lengths)[:, None]
    index = np.where(mask, starts[:, None] + positions[None, :], 0)
    return _Packed(torch.from_numpy(flat), torch.from_numpy(index), torch.from_numpy(mask))


def rolling_means_padded(z: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Rolling means [N, T] of right-padded logits, as ``token_probe.rolling_means`` computes them per row."""
    z = z * mask
    sums = torch.cumsum(z, dim=1)
    shifted = torch.cat([torch.zeros_like(sums[:, :window]), sums[:, :-window]], dim=1)[:, : z.shape[1]]
    counts = torch.clamp(torch.arange(1, z.shape[1] + 1, dtype=z.dtype), max=window)
    return (sums - shifted) / counts


def soft_max_score(means: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax(m/τ)-weighted mean of each row's valid rolling means: the max as τ → 0."""
    logits = (means / tau).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return (weights * means.masked_fill(~mask, 0.0)).sum(dim=1)


def fit_token_scorer(sequences: Sequence[npt.ArrayLike], labels: npt.ArrayLike, weights: npt.ArrayLike | None,
                     fit: TokenScorerFit, *, skip: int = 0) -> tuple[LinearHead, TokenScorer]:
    """The head (on standardised states, for a bundle) and its runtime scorer; both train and score on the
    tokens after the first ``skip`` (``TokenScorer.content``: the shared template prefix is not evidence)."""
    template = TokenScorer(weight=np.zeros(1, dtype=np.float32), bias=0.0, window=1, skip=skip)
    sequences = [template.content(s) for s in sequences]
    y_np = np.asarray(labels, dtype=np.float32)
    if len(sequences) != len(y_np) or not len(y_np):
        raise ValueError("need one label per sequence")
    if len(np.unique(y_np)) < 2:
        raise ValueError("the token scorer needs both classes in its training data")
    w_np = np.ones(len(y_np), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    w_np = w_np / w_np.mean()
    mean, scale = token_standardisation(sequences)
    packed = _pack(sequences, mean, scale)
    torch.manual_seed(fit.seed)
    y, w = torch.from_numpy(y_np), torch.from_numpy(w_np)
    weight = torch.zeros(packed.flat.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=fit.lr)
    lengths = packed.mask.sum(dim=1).clamp_min(1)
    taus = np.geomspace(fit.tau_start, fit.tau_end, fit.epochs) if fit.epochs > 1 else np.asarray([fit.tau_end])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for epoch in range(fit.epochs):
        optimiser.zero_grad()
        z = (packed.flat @ weight + bias)[packed.index]  # [N, Tmax]
        if fit.objective == "maxmean":
            score = soft_max_score(rolling_means_padded(z, packed.mask, fit.window), packed.mask,
                                   float(taus[epoch]))
            loss = (w * bce(score, y, reduction="none")).mean()
        else:
            per_token = bce(z, y[:, None].expand_as(z), reduction="none") * packed.mask
            loss = (w * per_token.sum(dim=1) / lengths).mean()
        loss = loss + 0.5 * fit.l2 * (weight**2).sum()
        loss.backward()
        optimiser.step()
    head = LinearHead(mean=mean, scale=scale, weight=weight.detach().numpy().astype(np.float32),
                      bias=float(bias.detach()[0]))
    return head, TokenScorer.from_head(head, fit.window, skip)
