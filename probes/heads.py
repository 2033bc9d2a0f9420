"""Light heads on pooled activations: a standardised logistic probe (safety; binary DV)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression

FloatArray = npt.NDArray[np.float32]


def sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class LinearHead:
    """w·((x − mean)/scale) + b, stored as four tensors; cost ≈ 2·d FLOPs per item."""

    mean: FloatArray
    scale: FloatArray
    weight: FloatArray
    bias: float

    def logit(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        x = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        return (x @ self.weight).astype(np.float64) + self.bias

    def proba(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return sigmoid(self.logit(features))

    def folded(self) -> tuple[FloatArray, float]:
        """Weights on raw features (standardisation folded in), for per-token scoring."""
        w = (self.weight / self.scale).astype(np.float32)
        return w, float(self.bias - float(self.mean @ w))

    def to_tensors(self, prefix: str) -> dict[str, npt.NDArray[np.float32]]:
        return {
            f"{prefix}.mean": self.mean,
            f"{prefix}.scale": self.scale,
            f"{prefix}.weight": self.weight,
            f"{prefix}.bias": np.asarray([self.bias], dtype=np.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, npt.NDArray[np.float32]], prefix: str) -> LinearHead:
        return cls(
            mean=tensors[f"{prefix}.mean"].astype(np.float32),
            scale=tensors[f"{prefix}.scale"].astype(np.float32),
            weight=tensors[f"{prefix}.weight"].astype(np.float32),
            bias=float(tensors[f"{prefix}.bias"][0]),
        )


def standardisation(features: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def fit_logistic(
    features: npt.ArrayLike, labels: npt.ArrayLike, *, c: float = 0.5, max_iter: int = 2000, seed: int = 0,
    sample_weight: npt.ArrayLike | None = None,
) -> LinearHead:
    """L2 logistic regression on standardised features (optionally weighted per item)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("logistic probe needs both classes in its training data")
    mean, scale = standardisation(x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    model.fit((x - mean) / scale, y, sample_weight=weights)
    return LinearHead(
        mean=mean, scale=scale, weight=model.coef_[0].astype(np.float32), bias=float(model.intercept_[0])
    )
