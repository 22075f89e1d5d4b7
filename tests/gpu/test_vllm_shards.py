"""SVF swaps under tensor parallelism, on vLLM's own layers (skipped without vLLM).

A swap writes whole Hugging Face matrices into one file; every worker reads it and each of vLLM's weight
loaders keeps that worker's shard. This builds vLLM's real parallel layers (QKVParallelLinear with grouped
key/value heads, MergedColumnParallelLinear, RowParallelLinear) as rank r of a tensor-parallel group of
size 2 and 4, one rank after another in this process (vLLM's rank and size lookups answer for the rank
being built; no second GPU and no collective is needed, because loading a shard involves none), loads the
same swap file into each, and checks that the shards put back together are exactly the matrices, key and
value heads copied where there are more ranks than heads, and that the workers' weight sums add up to
the whole matrices' (what the multi-GPU test reads). The forward pass across GPUs is the multi-GPU test's.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.vllm.worker import WeightSwapExtension


@pytest.fixture(autouse=True)
def real_vllm():
    """vLLM's parallel layers (skipped without vLLM, or where another test put a stand-in in its place)."""
    pytest.importorskip("vllm.model_executor.layers.linear", reason="needs vLLM")

HIDDEN, HEAD, HEADS, KV_HEADS, FFN = 256, 32, 8, 2, 512


@contextlib.contextmanager
def as_rank(rank: int, size: int):
    """vLLM's tensor-parallel rank and size lookups answer (rank, size) while layers are built and loaded."""
    import vllm.distributed as dist
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    mods = [m for m in (linear, parameter, dist) if hasattr(m, "get_tensor_model_parallel_rank")]
    saved = [(m, m.get_tensor_model_parallel_rank, m.get_tensor_model_parallel_world_size) for m in mods]
    for m in mods:
        m.get_tensor_model_parallel_rank = lambda: rank
        m.get_tensor_model_parallel_world_size = lambda: size
    try:
        yield
    finally:
        for m, r, w in saved:
            m.get_tensor_model_parallel_rank, m.get_tensor_model_parallel_world_size = r, w


class Worker(WeightSwapExtension):
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model


def vllm_layers(rank: int, size: int) -> nn.Module:
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    with as_rank(rank, size):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False,
                                                     params_dtype=torch.float32)
        layer.self_attn.o_proj = RowParallelLinear(HEADS * HEAD, HIDDEN, bias=False, params_dtype=torch.float32)
        layer.mlp = nn.Module()
        layer.mlp.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False,
                                                            params_dtype=torch.float32)
        layer.mlp.down_proj = RowParallelLinear(FFN, HIDDEN, bias=False, params_dtype=torch.float32)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                    "gate_up_proj": ["gate_proj", "up_proj"]}
    return model


def matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (HEADS * HEAD, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * HEAD, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    return {f"model.layers.0.{n}": torch.randn(*s, generator=g) for n, s in shapes.items()}


@pytest.mark.parametrize("size", [2, 4])
def test_every_rank_gets_its_shard_of_a_swap(tmp_path, size):
    mats = matrices()
    path = tmp_path / "swap.safetensors"
    save_file(mats, str(path))
    workers = []
    for rank in range(size):
        model = vllm_layers(rank, size)
        with as_rank(rank, size):
            worker = Worker(model)
            assert worker.t2_load_weights(str(path)) == len(mats)
        workers.append(worker)
    layers = [w.model.model.layers[0] for w in workers]
    m = {n.removeprefix("model.layers.0."): w for n, w in mats.items()}

    # Column-parallel: each rank holds a contiguous block of every fused part's rows.
    q_rows, kv_rows = HEADS * HEAD // size, max(KV_HEADS // size, 1) * HEAD
    qkv = [layer.self_attn.qkv_proj.weight.data for layer in layers]
    assert all(p.shape == (q_rows + 2 * kv_rows, HIDDEN) for p in qkv)
    torch.testing.assert_close(torch.cat([p[:q_rows] for p in qkv]), m["self_attn.q_proj"], rtol=0, atol=0)
    replicas = max(size // KV_HEADS, 1)
    for part, name in ((slice(q_rows, q_rows + kv_rows), "k_proj"), (slice(q_rows + kv_rows, None), "v_proj")):
        # ranks r*replicas .. r*replicas + replicas-1 share head group r when there are more ranks than heads
        whole = torch.cat([qkv[r][part] for r in range(0, size, replicas)])
        torch.testing.assert_close(whole, m[f"self_attn.{name}"], rtol=0, atol=0)
        for r in range(size):
            torch.testing.assert_close(qkv[r][part], qkv[r - r % replicas][part], rtol=0, atol=0)
    gate_up = [layer.mlp.gate_up_proj.weight.data for layer in layers]
    torch.testing.assert_close(torch.cat([p[:FFN // size] for p in gate_up]), m["mlp.gate_proj"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[FFN // size:] for p in gate_up]), m["mlp.up_proj"], rtol=0, atol=0)
    # Row-parallel: each rank holds a block of the input columns.
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        parts = [layer.get_submodule(name).weight.data for layer in layers]
        torch.testing.assert_close(torch.cat(parts, dim=1), m[name], rtol=0, atol=0)

    # The workers' weight sums add up to the whole matrices' (copied heads counted once).
    sums = [w.t2_weight_sums(list(mats)) for w in workers]
    for name, w in mats.items():
        total = [sum(s[name][0] for s in sums), sum(s[name][1] for s in sums)]
        assert total[0] == pytest.approx(float(w.double().sum()), abs=1e-6), name
        assert total[1] == pytest.approx(float(w.double().pow(2).sum()), rel=1e-9), name
