"""Accuracy with a 95% Wilson score interval (well behaved at 0%, 100% and small n, unlike p ± 1.96·se)."""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the score interval for ``correct`` successes out of ``n``; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_cell(correct: int, n: int) -> dict:
    lo, hi = wilson(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else None, "ci95": [lo, hi]}


def format_cell(cell: dict | None) -> str:
    """'41.2 [36.1, 46.5] n=261' (percent), or the reason a cell is missing."""
    if not cell:
        return "—"
    if cell.get("error"):
        return "n/a"
    if cell.get("accuracy") is None:
        return "— (n=0)"
    lo, hi = cell["ci95"]
    return f"{100 * cell['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] n={cell['n']}"
