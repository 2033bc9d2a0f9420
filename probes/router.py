"""SafeRoute-style router: an MLP on the same pooled features, trained for the binary DV target.

Stored as plain tensors (no pickle) and evaluated with numpy, so the worker needs no sklearn object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.neural_network import MLPClassifier

from probes.heads import sigmoid, standardisation

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class MLPHead:
    mean: F32
    scale: F32
    weights: tuple[F32, ...]
    biases: tuple[F32, ...]

    def proba(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        h = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.maximum(h @ w + b, 0.0)
        logit = (h @ self.weights[-1] + self.biases[-1]).astype(np.float64)[:, 0]
        return sigmoid(logit)

    def to_tensors(self, prefix: str) -> dict[str, F32]:
        out = {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"{prefix}.w{i}"] = w
            out[f"{prefix}.b{i}"] = b
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, F32], prefix: str) -> MLPHead:
        layers = sum(1 for k in tensors if k.startswith(f"{prefix}.w"))
        return cls(
            mean=tensors[f"{prefix}.mean"], scale=tensors[f"{prefix}.scale"],
            weights=tuple(tensors[f"{prefix}.w{i}"] for i in range(layers)),
            biases=tuple(tensors[f"{prefix}.b{i}"] for i in range(layers)),
        )


def fit_router(features: npt.ArrayLike, target: npt.ArrayLike, *, hidden: tuple[int, ...] = (256, 64),
               seed: int = 0) -> MLPHead:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(target, dtype=np.int64)
    if y.sum() < 2:
        raise ValueError("router target has fewer than 2 positives")
    mean, scale = standardisation(x)
    # Few positives: balance them by repetition (MLPClassifier has no class weights).
    pos = np.flatnonzero(y == 1)
    reps = max(1, int((len(y) - len(pos)) / max(1, len(pos))))
    idx = np.concatenate([np.arange(len(y)), np.repeat(pos, reps - 1)])
    model = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-2, max_iter=300, early_stopping=False,
                          random_state=seed)
    model.fit((x[idx] - mean) / scale, y[idx])
    return MLPHead(
        mean=mean, scale=scale,
        weights=tuple(w.astype(np.float32) for w in model.coefs_),
        biases=tuple(b.astype(np.float32) for b in model.intercepts_),
    )
