"""Where a Hugging Face matrix lives among vLLM's linear layers (fused layers, tensor-parallel shards).

Pure functions of vLLM's layer attributes (no vLLM import), used in its worker processes.
"""
from __future__ import annotations

import torch


def vllm_slot(model: torch.nn.Module, hf_name: str) -> tuple[torch.nn.Module, object, int | None]:
    """(linear layer holding ``hf_name``'s weight, the shard id its loader takes or None, shard index)."""
    packed = getattr(model, "packed_modules_mapping", None) or {}
    parent, _, leaf = hf_name.rpartition(".")
    index = None
    for fused, parts in packed.items():
        if leaf in parts:
            leaf, index = fused, parts.index(leaf)
            break
    module = model.get_submodule(f"{parent}.{leaf}" if parent else leaf)
    layer = getattr(module, "base_layer", module)
    if index is None:
        return layer, None, None
    shard = "qkv"[index] if type(layer).__name__.startswith("QKV") else index
    return layer, shard, index


def load_matrix(model: torch.nn.Module, hf_name: str, weight: torch.Tensor) -> None:
    layer, shard, _ = vllm_slot(model, hf_name)
    param = layer.weight
    loader = getattr(param, "weight_loader", None)
    if loader is None:  # a plain parameter: the whole matrix, no sharding
        param.data.copy_(weight)
    elif shard is None:
        loader(param, weight)
    else:
        loader(param, weight, shard)


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
