"""Inference-only heads on pooled activations: stored weights → scores, numpy only.

This is the runtime half of the heads (the worker imports it); fitting them lives in ``probes.fitting.heads``, which
the runtime never imports, so the shipped scorer does not load sklearn or scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
EXTRA_FEATURES = ("probe_logit", "abs_margin")


def sigmoid(x: F64) -> F64:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def uncertainty(p: npt.ArrayLike) -> F64:
    """−|p − 0.5|: highest where the probe is least sure."""
    return -np.abs(np.asarray(p, dtype=np.float64) - 0.5)


def with_extra_features(features: npt.ArrayLike, p: npt.ArrayLike) -> FloatArray:
    """Activations + [probe logit, |p − 0.5|]: the DV head's inputs, at training and at inference alike."""
    x = np.asarray(features, dtype=np.float32)
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(q) - np.log(1 - q)
    return np.concatenate([x, np.stack([logit, np.abs(q - 0.5)], axis=1).astype(np.float32)], axis=1)


@dataclass(frozen=True)
class LinearHead:
    """w·((x − mean)/scale) + b, stored as four tensors; cost ≈ 2·d FLOPs per item."""

    mean: FloatArray
    scale: FloatArray
    weight: FloatArray
    bias: float

    def logit(self, features: npt.ArrayLike) -> F64:
        x = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        return (x @ self.weight).astype(np.float64) + self.bias

    def proba(self, features: npt.ArrayLike) -> F64:
        return sigmoid(self.logit(features))

    def folded(self) -> tuple[FloatArray, float]:
        """Weights on raw features (standardisation folded in), for per-token scoring."""
        w = (self.weight / self.scale).astype(np.float32)
        return w, float(self.bias - float(self.mean @ w))

    def to_tensors(self, prefix: str) -> dict[str, FloatArray]:
        return {
            f"{prefix}.mean": self.mean,
            f"{prefix}.scale": self.scale,
            f"{prefix}.weight": self.weight,
            f"{prefix}.bias": np.asarray([self.bias], dtype=np.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, FloatArray], prefix: str) -> LinearHead:
        return cls(
            mean=tensors[f"{prefix}.mean"].astype(np.float32),
            scale=tensors[f"{prefix}.scale"].astype(np.float32),
            weight=tensors[f"{prefix}.weight"].astype(np.float32),
            bias=float(tensors[f"{prefix}.bias"][0]),
        )


@dataclass(frozen=True)
class MLPHead:
    """The router: a ReLU MLP with a sigmoid output, stored as plain tensors (no pickle, no sklearn object)."""

    mean: FloatArray
    scale: FloatArray
    weights: tuple[FloatArray, ...]
    biases: tuple[FloatArray, ...]

    def proba(self, features: npt.ArrayLike) -> F64:
        h = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.maximum(h @ w + b, 0.0)
        logit = (h @ self.weights[-1] + self.biases[-1]).astype(np.float64)[:, 0]
        return sigmoid(logit)

    def to_tensors(self, prefix: str) -> dict[str, FloatArray]:
        out = {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"{prefix}.w{i}"] = w
            out[f"{prefix}.b{i}"] = b
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, FloatArray], prefix: str) -> MLPHead:
        layers = sum(1 for k in tensors if k.startswith(f"{prefix}.w"))
        return cls(
            mean=tensors[f"{prefix}.mean"], scale=tensors[f"{prefix}.scale"],
            weights=tuple(tensors[f"{prefix}.w{i}"] for i in range(layers)),
            biases=tuple(tensors[f"{prefix}.b{i}"] for i in range(layers)),
        )
