"""Continual-learning metrics of a score matrix (REFERENCE.md §2), as pure functions.

``a[i][j]`` is the score on task j after learning tasks 0..i (0-based, T tasks). Only j <= i is used:
row i may stop after its diagonal entry (a full T × T matrix works too).
- AP   = mean_j a[T-1][j]                                   (average performance at the end)
- F.Ra = mean_{j<T-1} (max_{j<=i<T-1} a[i][j] − a[T-1][j])  (forgetting: best score once learned, minus the last)
- BWT  = mean_{j<T-1} (a[T-1][j] − a[j][j])                  (divided by T−1, not by T)
- FWT  = mean_j (a[j][j] − alone[j])                         (alone[j]: the same PET method trained on task j alone)
GEM's original FWT (a[j-1][j] minus a random-initialisation score) is not what FWT means here.
"""
from __future__ import annotations

from typing import Sequence


def _check(a: Sequence[Sequence[float]]) -> int:
    T = len(a)
    if T == 0 or any(len(row) < i + 1 for i, row in enumerate(a)) or len(a[-1]) != T:
        raise ValueError("the score matrix needs T >= 1 rows, row i with at least i + 1 scores, the last with T")
    return T


def lower_triangle(rows: Sequence[dict[str, float]], tasks: Sequence[str]) -> list[list[float]]:
    """Rows of scores by task name (task j learned at position j) -> a[i][j] for j <= i."""
    return [[row[tasks[j]] for j in range(i + 1)] for i, row in enumerate(rows)]


def average_performance(a) -> float:
    T = _check(a)
    return sum(a[T - 1]) / T


def forgetting_rate(a) -> float | None:
    T = _check(a)
    if T < 2:
        return None
    return sum(max(a[i][j] for i in range(j, T - 1)) - a[T - 1][j] for j in range(T - 1)) / (T - 1)


def backward_transfer(a) -> float | None:
    T = _check(a)
    if T < 2:
        return None
    return sum(a[T - 1][j] - a[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(a, alone: Sequence[float] | None) -> float | None:
    T = _check(a)
    if alone is None:
        return None
    if len(alone) != T:
        raise ValueError("alone needs one score per task")
    return sum(a[j][j] - alone[j] for j in range(T)) / T


def all_metrics(a, alone: Sequence[float] | None = None) -> dict[str, float | None]:
    return {"AP": average_performance(a), "F.Ra": forgetting_rate(a), "FWT": forward_transfer(a, alone),
            "BWT": backward_transfer(a)}
