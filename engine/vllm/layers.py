"""Where a Hugging Face matrix's rows live inside vLLM's linear layers (fused layers, tensor-parallel shards).

Pure functions of vLLM's layer attributes (no vLLM import), used in its worker processes.
"""
from __future__ import annotations

import torch


def shard_rows(layer: torch.nn.Module, index: int | None) -> slice:
    """Rows of this worker's ``layer.weight`` that hold its part of sub-matrix ``index`` of a fused layer
    (vLLM's ``output_sizes`` are the full sizes; each rank holds 1/tp of every one)."""
    if index is None:
        return slice(None)
    sizes = list(layer.output_sizes)
    tp = getattr(layer, "tp_size", 1)
    start = sum(sizes[:index]) // tp
    return slice(start, start + sizes[index] // tp)


def replicas(layer: torch.nn.Module, index: int | None) -> int:
    """How many ranks hold the same rows: key/value heads are copied when there are more ranks than them."""
    if index in (1, 2) and type(layer).__name__.startswith("QKV"):
        return int(getattr(layer, "num_kv_head_replicas", 1))
    return 1
