"""Continual-learning metrics in loss terms: pure functions of the loss matrix.

R[i][j] is the validation loss on the domain of task j after training task i (T tasks, so
R is T x T); b[j] is the loss of the randomly initialised model on domain j. Lower loss is
better, so signs are chosen to read naturally:

- learned loss (plasticity): R[j][j], mean over j.
- retained loss: mean_j R[T-1][j], the final model on every domain.
- forgetting (Chaudhry et al. 2018, "Riemannian Walk"), loss terms:
  f_j = R[T-1][j] - min_{l < T-1} R[l][j] for j < T-1, averaged; > 0 means forgotten.
- BWT (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"), loss terms:
  mean_{i < T-1} (R[i][i] - R[T-1][i]); > 0 means later tasks improved earlier ones.
- FWT: mean_{i >= 1} (b[i] - R[i-1][i]); > 0 means earlier tasks helped before training on i.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"loss matrix must be square [tasks, tasks], got shape {R.shape}")
    return R


def learned_loss(R) -> float:
    return float(np.mean(np.diag(_matrix(R))))


def retained_loss(R) -> float:
    return float(np.mean(_matrix(R)[-1]))


def forgetting(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    f = [R[-1, j] - R[: T - 1, j].min() for j in range(T - 1)]
    return float(np.mean(f))


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[i, i] - R[-1, i] for i in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    b = np.asarray(b, dtype=np.float64)
    if T < 2:
        return None
    return float(np.mean([b[i] - R[i - 1, i] for i in range(1, T)]))


def summary(R, b: Sequence[float] | None = None) -> dict:
    """All metrics of a run; perplexity (exp of loss) beside each loss."""
    out = {"learned_loss": learned_loss(R), "retained_loss": retained_loss(R),
           "forgetting": forgetting(R), "bwt": backward_transfer(R)}
    out["learned_ppl"] = math.exp(out["learned_loss"])
    out["retained_ppl"] = math.exp(out["retained_loss"])
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
    return out
