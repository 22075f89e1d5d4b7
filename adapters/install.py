"""Module surgery: put an ``AdaptiveLinear`` in place of every target layer of a loaded model.

This is the expensive start-up step (DESIGN.md habit 5): find the targets, get their SVD factors
(from the disk cache when possible), swap the layers, and hand back the runtime the engine drives.
"""
from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from adapters.layer import ActiveTable, AdaptiveLinear
from adapters.runtime import AdaptationRuntime
from adapters.svd_cache import SVDFactors, load_or_compute
from adapters.targets import Target, find_targets


def install(
    model: nn.Module,
    targets: str | Sequence[str] = "mlp",
    svd_cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    **runtime_options,
) -> AdaptationRuntime:
    """Adapt ``model`` in place and return its runtime.

    ``targets``: "mlp" (default), "attn", "all", or module names/suffixes (see ``targets.find_targets``).
    ``svd_cache_dir``: where SVD factors are cached (e.g. ``<cache_dir>/svd``); None = no
    disk cache. ``runtime_options`` go to ``AdaptationRuntime`` (max_resolved, max_merged,
    merge_after). Outputs are unchanged until a step table is activated.
    Call it after the model is on its device and in its dtype: factors are made to match it then, and
    a later ``model.to(dtype)`` would also cast σ, which must stay float32.
    """
    if any(isinstance(m, AdaptiveLinear) for m in model.modules()):
        raise ValueError("adaptation layers are already installed in this model")
    found = find_targets(model, targets)
    factors = load_or_compute(model, found, svd_cache_dir, progress=progress)
    install_factors(model, found, factors)
    return AdaptationRuntime(model, **runtime_options)


def install_factors(model: nn.Module, found: Sequence[Target], factors: dict[str, SVDFactors]) -> None:
    """The surgery alone: an ``AdaptiveLinear`` in place of each of ``found`` (cheap; the factors are
    computed already). A runtime made before (``expected=found``) then takes them with ``scan()``."""
    slot = ActiveTable()
    for t in found:
        parent_name, _, child = t.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptiveLinear(getattr(parent, child), t, factors[t.name], slot))
