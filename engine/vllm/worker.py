"""Runs inside vLLM's workers (named as vLLM's ``worker_extension_cls``): weights loaded in place.

The front end writes the matrices of a swap into one safetensors file under Hugging Face module names
(``model.layers.0.mlp.gate_proj``, W as (out, in)); every worker reads it and hands each matrix to the
weight loader of the parameter that holds it. The loaders are vLLM's own: they place the matrix in its
slot of a fused parameter (gate_proj -> gate_up_proj[0], q_proj -> qkv_proj["q"]) and keep this
worker's tensor-parallel shard, so one file serves any tensor-parallel size. Parameters are written
in place (same storage), which keeps CUDA graphs valid. A LoRA-wrapped layer keeps its weight in
``base_layer``.

Kept free of other project imports: it is imported by vLLM in its worker processes.
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


class WeightSwapExtension:
    """Methods vLLM adds to its workers, called through ``collective_rpc``."""

    def t2_load_weights(self, path: str) -> int:
        """Load every matrix of the safetensors file at ``path``; returns how many were loaded."""
        from safetensors import safe_open

        model = self.get_model()
        n = 0
        with torch.inference_mode(), safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                load_matrix(model, name, f.get_tensor(name))
                n += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done when the call returns
        return n

    def t2_weight_sums(self, names: list[str]) -> dict[str, list[float]]:
        """[Σw, Σw²] (float64) of this worker's part of each matrix, divided by the ranks that hold the
        same part: the sums over all workers are the whole matrix's (lets a test check what a swap put
        where, at any tensor-parallel size)."""
        model = self.get_model()
        out = {}
        with torch.inference_mode():
            for name in names:
                layer, _, index = vllm_slot(model, name)
                w = layer.weight[shard_rows(layer, index)].double()
                n = replicas(layer, index)
                out[name] = [float(w.sum()) / n, float(w.pow(2).sum()) / n]
        return out
