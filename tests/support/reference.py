"""The plain reference computations fast paths are checked against: a model whose weights are replaced by
the merged W' of an SVF mixture (from a float64 SVD), and pass 1's category probabilities from one full
forward."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from adapters.adaptation import SVFExpert
from experts.pass1.classify import build_classifier_prompt

TEXT = "Compute 17 times 23 and explain each step."  # a request pass 1 classifies


MLP = ("gate_proj", "up_proj", "down_proj")


def mlp_targets(model) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.{p}": getattr(layer.mlp, p).weight
            for i, layer in enumerate(model.model.layers) for p in MLP}


def random_expert(name: str, weights: dict[str, torch.Tensor], seed: int) -> SVFExpert:
    g = torch.Generator().manual_seed(seed)
    return SVFExpert(name, {n: 2.0 * torch.randn(min(w.shape), generator=g) for n, w in weights.items()})


def reference_model(model_dir, experts: list[tuple[SVFExpert, float]]):
    """The model with every target weight replaced by the merged sakana W' of the mixture."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, w in mlp_targets(model).items():
        z = sum(a * e.z[name].double() for e, a in experts)
        U, S, Vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        m = torch.sigmoid(z)
        s = S * m * (S.sum() / (S * m).sum())
        w.data.copy_((U * s) @ Vh)
    return model


def reference_probs(model, tok, categories) -> dict[str, float]:
    prompt = build_classifier_prompt(tok, categories)
    ids = prompt.ids_for(tok, TEXT)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)[list(prompt.label_ids)]
    return dict(zip(prompt.labels, logp.softmax(-1).tolist()))
