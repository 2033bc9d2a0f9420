"""The interface every expert backend implements: P(unsafe) per conversation, scored in batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from probes.conversation import Conversation


@runtime_checkable
class Expert(Protocol):
    """A batched scorer. Implementations raise ExpertError (or ExpertUnavailable when retrying later helps)."""

    @property
    def name(self) -> str:
        """Stable identifier of the backend and its weights (goes into manifests and verdicts)."""
        ...

    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        """Return P(unsafe) in [0, 1] for each conversation, in order."""
        ...

    def parameters_per_token(self) -> int:
        """Model parameters touched per token (for cost accounting in parameters x tokens); 0 if unknown."""
        ...
