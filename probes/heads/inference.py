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
#: The DV head's extra inputs: the probe's logit and its distance from the decision (``abs_margin``: |p − 0.5|, on
#: heads trained before the cut was the centre; ``abs_logit_margin``: |logit p − logit cut|).
EXTRA_FEATURES = ("probe_logit", "abs_margin")
CUT_EXTRA_FEATURES = ("probe_logit", "abs_logit_margin")


def sigmoid(x: F64) -> F64:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def logit(p: npt.ArrayLike) -> F64:
    """log(p / (1 − p)), p clipped to [1e-7, 1 − 1e-7] so 0 and 1 stay finite."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    out: F64 = np.log(q) - np.log(1 - q)
    return out


def uncertainty(p: npt.ArrayLike, centre: float | None = None) -> F64:
    """How unsure the probe's decision is: highest at the cut the decision is taken at.

    ``centre`` is that cut: −|logit p − logit centre| (a calibrated cut such as 0.9996 sits where probabilities
    crowd together, so the distance is measured in log-odds). None: −|p − 0.5|, what bundles calibrated before
    the cut was the centre were calibrated with.
    """
    if centre is None:
        return -np.abs(np.asarray(p, dtype=np.float64) - 0.5)
    return -np.abs(logit(p) - logit(centre))


def with_extra_features(features: npt.ArrayLike, p: npt.ArrayLike, centre: float | None = None) -> FloatArray:
    """Activations + [probe logit, distance from the decision]: the DV head's inputs, at training and inference.

    The distance is |logit p − logit centre| around the probe cut the head was trained at (``CUT_EXTRA_FEATURES``),
    or |p − 0.5| with ``centre=None`` (``EXTRA_FEATURES``, heads trained before).
    """
    x = np.asarray(features, dtype=np.float32)
    z = logit(p)
    margin = np.abs(np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7) - 0.5) if centre is None else np.abs(
        z - logit(centre))
    return np.concatenate([x, np.stack([z, margin], axis=1).astype(np.float32)], axis=1)


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
