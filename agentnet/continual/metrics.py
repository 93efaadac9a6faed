"""Continual-learning metrics over an accuracy matrix (GEM, Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

``R`` has shape ``(T+1, T)``: row 0 is accuracy on every task before training, row ``i`` (1-based)
after training task ``i``. With tasks numbered 1..T and ``R[i][j]`` accuracy on task ``j`` after
task ``i``:

* ``ACC = mean_j R[T][j]``
* ``BWT = mean_{j<T} (R[T][j] - R[j][j])``
* ``FWT = mean_{j>1} (R[j-1][j] - R[0][j])``
* forgetting ``f_j = max_{1<=l<T} R[l][j] - R[T][j]``, averaged over ``j < T`` (Chaudhry et al.)
* learning accuracy ``R[j][j]``: each task's accuracy right after learning it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["accuracy", "backward_transfer", "forward_transfer", "forgetting", "learning_accuracy", "summarize"]


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] + 1:
        raise ValueError(f"accuracy matrix must have shape (T+1, T) with row 0 before training, got {m.shape}")
    return m


def accuracy(R) -> float:
    """ACC: mean final accuracy over all tasks."""
    m = _matrix(R)
    return float(m[-1].mean())


def backward_transfer(R) -> float:
    """BWT: mean change of each earlier task's accuracy from just after learning it to the end."""
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([m[T, j] - m[j + 1, j] for j in range(T - 1)]))


def forward_transfer(R) -> float:
    """FWT: mean accuracy on each task just before learning it, relative to the untrained model."""
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([m[j, j] - m[0, j] for j in range(1, T)]))


def forgetting(R) -> float:
    """Average forgetting: best accuracy a task had (after learning it) minus its final accuracy."""
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([m[1:T, j].max() - m[T, j] for j in range(T - 1)]))


def learning_accuracy(R) -> list[float]:
    """``R[j][j]`` for every task: its accuracy right after it was learned."""
    m = _matrix(R)
    return [float(m[j + 1, j]) for j in range(m.shape[1])]


def summarize(R) -> dict[str, float | list[float]]:
    """All metrics of ``R`` by their Avalanche-style names (see ``docs/continual.md``)."""
    return {
        "ACC": accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
    }
