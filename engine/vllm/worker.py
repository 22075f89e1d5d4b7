"""Runs inside vLLM's workers (named as vLLM's ``worker_extension_cls``): weights loaded in place.

The front end writes the matrices of a swap into one safetensors file under Hugging Face module names
(``model.layers.0.mlp.gate_proj``, W as (out, in)); every worker reads it and hands each matrix to the
weight loader of the parameter that holds it. The loaders are vLLM's own: they place the matrix in its
slot of a fused parameter (gate_proj -> gate_up_proj[0], q_proj -> qkv_proj["q"]) and keep this
worker's tensor-parallel shard, so one file serves any tensor-parallel size. Parameters are written
in place (same storage), which keeps CUDA graphs valid. A LoRA-wrapped layer keeps its weight in
``base_layer``.

The per-row adaptation's RPCs (``t2_rows_*``) are here too; importing this module in a worker whose
environment names a per-row configuration (``T2_ROWS``) installs its hooks in vLLM's model runner, before
the runner exists (vLLM imports the extension class first).
"""
from __future__ import annotations

import os

import torch

from engine.vllm.layers import load_matrix, replicas, shard_rows, vllm_slot
from engine.vllm.rows_worker import ENV as ROWS_ENV
from engine.vllm.rows_worker import install_runner_hooks, rows_of


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

    # --- per-row adaptation (engine.vllm.rows_worker) ------------------------------------------------
    def t2_rows_info(self) -> dict:
        return rows_of(self).info()

    def t2_rows_sigma(self) -> dict[str, torch.Tensor]:
        return rows_of(self).sigma()

    def t2_rows_put_expert(self, digest: str, path: str, parametrization: str) -> None:
        rows_of(self).put_expert(digest, path, parametrization)

    def t2_rows_drop_expert(self, digest: str) -> None:
        rows_of(self).tables.drop_expert(digest)

    def t2_rows_put_bundle(self, key: str, path: str, rank: int, offset: int) -> int:
        return rows_of(self).put_bundle(key, path, rank, offset)

    def t2_rows_drop_bundle(self, key: str) -> None:
        rows_of(self).drop_bundle(key)


if os.environ.get(ROWS_ENV):
    install_runner_hooks()
