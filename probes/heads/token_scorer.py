"""The token-level conversation scorer: a linear head on every token state, aggregated by the max of rolling means.

Runtime only (numpy). A conversation's score is max_t m_t, m_t the mean of the last ``window`` token logits (fewer
before the window-th token, ``token_probe.rolling_means``): a short harmful span keeps its score however much
benign text surrounds it, where a mean over the whole text falls with its share of the tokens (Kramár et al.
2026, the production probes' rolling-mean max). The same aggregation scores a streamed response token by token
(``token_probe.StreamAggregate``'s ``rolling_max``): one head for both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probes.heads.inference import LinearHead, sigmoid
from probes.heads.token_probe import rolling_means

F64 = npt.NDArray[np.float64]


def max_rolling_mean(token_logits: npt.ArrayLike, window: int) -> float:
    """max_t of the rolling means of one sequence's logits (−inf for an empty sequence)."""
    means = rolling_means(token_logits, window)
    return float(means.max()) if means.size else float("-inf")


@dataclass(frozen=True)
class TokenScorer:
    """A ``LinearHead`` folded onto raw token states (2·d FLOPs a token), its rolling window, and how many leading
    tokens it skips: the chat template's shared prefix (``token_states.template_prefix``), whose states are the
    same in every conversation of a causal model and would set a floor under every conversation's max."""

    weight: npt.NDArray[np.float32]
    bias: float
    window: int
    skip: int = 0

    @classmethod
    def from_head(cls, head: LinearHead, window: int, skip: int = 0) -> TokenScorer:
        if window < 1 or skip < 0:
            raise ValueError(f"need window >= 1 and skip >= 0, got {window} and {skip}")
        w, c = head.folded()
        return cls(weight=w, bias=c, window=window, skip=skip)

    def content(self, states: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The states it reads: all but the first ``skip`` (all of them when nothing would be left)."""
        x = np.asarray(states, dtype=np.float32)
        return x[self.skip :] if x.shape[0] > self.skip else x

    def token_logits(self, states: npt.ArrayLike) -> F64:
        """z_t = wᵀh_t + c for each token state [T, D]."""
        return (np.asarray(states, dtype=np.float32) @ self.weight).astype(np.float64) + self.bias

    def logit(self, states: npt.ArrayLike) -> float:
        """The conversation's logit: the max of rolling means of its content tokens' logits."""
        return max_rolling_mean(self.token_logits(self.content(states)), self.window)

    def logits(self, sequences: Sequence[npt.ArrayLike]) -> F64:
        return np.asarray([self.logit(s) for s in sequences], dtype=np.float64)

    def proba(self, sequences: Sequence[npt.ArrayLike]) -> F64:
        return sigmoid(self.logits(sequences))
