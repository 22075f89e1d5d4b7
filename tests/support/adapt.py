"""Tiny random models and reference computations shared by the adapters tests."""
from __future__ import annotations

import copy

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from adapters import Adaptation, SVFExpert
from adapters.targets import weight_matrix

VOCAB = 97


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF inits some biases/weights to constants; make every matrix generic
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype).eval()


def random_expert(runtime, name: str, seed: int, parametrization: str = "sakana", scale: float = 1.0) -> SVFExpert:
    g = torch.Generator().manual_seed(seed)
    base = 0.0 if parametrization == "sakana" else 1.0
    z = {t.name: base + scale * torch.randn(t.rank, generator=g) for t in runtime.targets}
    return SVFExpert(name, z, parametrization)


def neutral_expert(runtime, parametrization: str = "sakana") -> SVFExpert:
    fill = 0.3 if parametrization == "sakana" else 1.0  # any constant is neutral for sakana
    return SVFExpert("neutral", {t.name: torch.full((t.rank,), fill) for t in runtime.targets}, parametrization)


def with_merged_weights(base_model: torch.nn.Module, runtime, adaptation: Adaptation) -> torch.nn.Module:
    """A plain copy of the (un-adapted) base model whose target weights are the merged W'."""
    ref = copy.deepcopy(base_model)
    merged = runtime.merged_weights(adaptation)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for t in runtime.targets:
            if t.name in merged:
                weight_matrix(modules[t.name].weight, t.kind).copy_(merged[t.name])
    return ref


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
