"""The worker extension's placement of Hugging Face matrices into vLLM-style layers: fused parameters
(gate_up_proj, qkv_proj with shard ids "q"/"k"/"v"), LoRA wrappers (``base_layer``), and each layer's own
weight loader (which keeps the worker's tensor-parallel shard). Stand-in layers follow vLLM's contract."""
from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from engine.vllm.worker import WeightSwapExtension, vllm_slot


class FusedLinear(nn.Module):
    """Like vLLM's MergedColumnParallelLinear / QKVParallelLinear on tensor-parallel rank ``rank`` of ``tp``."""

    def __init__(self, output_sizes, in_features, tp=1, rank=0, shard_names=None):
        super().__init__()
        self.output_sizes, self.tp_size, self.rank, self.names = output_sizes, tp, rank, shard_names
        self.weight = nn.Parameter(torch.zeros(sum(output_sizes) // tp, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.calls = []

    def weight_loader(self, param, w, shard):
        self.calls.append(shard)
        i = self.names.index(shard) if self.names else shard
        size = self.output_sizes[i] // self.tp_size
        start = sum(self.output_sizes[:i]) // self.tp_size
        param.data[start:start + size] = w[self.rank * size:(self.rank + 1) * size]


class QKVParallelLinear(FusedLinear):
    def __init__(self, *a, **kw):
        super().__init__(*a, shard_names=["q", "k", "v"], **kw)


class RowLinear(nn.Module):
    def __init__(self, out_features, in_features, tp=1, rank=0):
        super().__init__()
        self.tp_size, self.rank = tp, rank
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // tp), requires_grad=False)
        self.weight.weight_loader = lambda param, w: param.data.copy_(w.chunk(tp, dim=1)[rank])


class LoRAWrapped(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base_layer = base


def vllm_like_model(tp=1, rank=0):
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.qkv_proj = LoRAWrapped(QKVParallelLinear([8, 4, 4], 6, tp=tp, rank=rank))
    layer.mlp = nn.Module()
    layer.mlp.gate_up_proj = FusedLinear([10, 10], 6, tp=tp, rank=rank)
    layer.mlp.down_proj = LoRAWrapped(RowLinear(6, 10, tp=tp, rank=rank))
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return model


class Worker(WeightSwapExtension):
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model


def hf_matrices():
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (8, 6), "self_attn.k_proj": (4, 6), "self_attn.v_proj": (4, 6),
              "mlp.gate_proj": (10, 6), "mlp.up_proj": (10, 6), "mlp.down_proj": (6, 10)}
    return {f"model.layers.0.{n}": torch.randn(*s, generator=g) for n, s in shapes.items()}


def test_slots_follow_the_packed_mapping_and_lora_wrappers():
    model = vllm_like_model()
    layer, shard, index = vllm_slot(model, "model.layers.0.self_attn.k_proj")
    assert isinstance(layer, QKVParallelLinear) and (shard, index) == ("k", 1)
    layer, shard, index = vllm_slot(model, "model.layers.0.mlp.up_proj")
    assert layer is model.model.layers[0].mlp.gate_up_proj and (shard, index) == (1, 1)
    layer, shard, index = vllm_slot(model, "model.layers.0.mlp.down_proj")
    assert layer is model.model.layers[0].mlp.down_proj.base_layer and shard is None


def test_a_swap_file_lands_in_every_slot_and_shard(tmp_path):
    mats = hf_matrices()
    path = tmp_path / "swap.safetensors"
    save_file(mats, str(path))
    full = Worker(vllm_like_model())
    assert full.t2_load_weights(str(path)) == 6
    sums = full.t2_weight_sums(list(mats))
    for name, w in mats.items():
        assert sums[name] == [float(w.double().sum()), float(w.double().pow(2).sum())]
    mlp = full.model.model.layers[0].mlp
    torch.testing.assert_close(mlp.gate_up_proj.weight, torch.cat([mats["model.layers.0.mlp.gate_proj"],
                                                                   mats["model.layers.0.mlp.up_proj"]]))
    # Tensor parallel: each worker reads the same file and keeps its own shard through the loaders.
    for rank in range(2):
        part = Worker(vllm_like_model(tp=2, rank=rank))
        assert part.t2_load_weights(str(path)) == 6
        down = part.model.model.layers[0].mlp.down_proj.base_layer.weight
        torch.testing.assert_close(down, mats["model.layers.0.mlp.down_proj"][:, rank * 5:(rank + 1) * 5])
        qkv = part.model.model.layers[0].self_attn.qkv_proj.base_layer
        torch.testing.assert_close(qkv.weight[:4], mats["model.layers.0.self_attn.q_proj"][rank * 4:(rank + 1) * 4])
        assert sorted(qkv.calls) == ["k", "q", "v"]
