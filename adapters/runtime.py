"""Engine-facing entry point: per-step adaptation tables.

The engine never looks inside an adaptation. For every forward it passes the adaptation of each batch
row (``None`` = the base weights) to ``plan`` and runs the model inside ``activate(table)``. Layers read
the active table; they never look experts up themselves.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch


@dataclass
class StepTable:
    """Which adaptation each row of one forward uses."""

    rows: torch.Tensor  # (B,) int64: index into `adaptations`, -1 = base weights
    adaptations: list[Any]  # the distinct adaptations of this step, in index order
    layer_state: dict[str, Any] = field(default_factory=dict)  # per-layer stacked scales, filled by adapters


class AdaptationRuntime:
    """Owns the adapted model's per-step state. With no adapted layers installed every row is the base."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._active: StepTable | None = None

    def plan(self, rows: Sequence[Any]) -> StepTable | None:
        """Table for a batch whose row i carries ``rows[i]``; ``None`` when no row is adapted."""
        if all(r is None for r in rows):
            return None
        raise NotImplementedError("adapted rows need the adaptive layers installed")

    @contextlib.contextmanager
    def activate(self, table: StepTable | None) -> Iterator[None]:
        prev, self._active = self._active, table
        try:
            yield
        finally:
            self._active = prev
