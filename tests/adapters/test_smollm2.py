"""The adaptation core on the real SmolLM2-135M (30 layers, tied embeddings, GQA)."""
import copy

import pytest
import torch

from adapters import Adaptation, install
from tests.support.adapt import neutral_expert, random_expert, with_merged_weights

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol(smollm2_dir, cache_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model = copy.deepcopy(base)
    runtime = install(model, "all", cache_dir / "svd", progress=False)
    return base, model, runtime


def _logits(model, ids, runtime=None, rows=None):
    table = runtime.plan(rows) if runtime is not None else None
    with torch.no_grad(), (runtime.activate(table) if runtime else torch.enable_grad()):
        return model(input_ids=ids, use_cache=False).logits


def test_neutral_experts_reproduce_base_logits(smol):
    base, model, runtime = smol
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(base, ids)
    for p in ("sakana", "direct"):
        out = _logits(model, ids, runtime, [Adaptation.expert(neutral_expert(runtime, p))] * 2)
        assert (out - ref).abs().max().item() <= 1e-3, p


def test_mixed_batch_matches_merged_reference(smol):
    base, model, runtime = smol
    ids = torch.randint(0, 49152, (3, 8), generator=torch.Generator().manual_seed(1))
    e1, e2 = random_expert(runtime, "a", 1, scale=0.3), random_expert(runtime, "b", 2, scale=0.3)
    rows = [Adaptation.expert(e1), Adaptation.mixture({e1: 0.5, e2: 0.5}), None]
    out = _logits(model, ids, runtime, rows)
    for i, a in enumerate(rows[:2]):
        ref = _logits(with_merged_weights(base, runtime, a), ids[i:i + 1])
        assert (out[i:i + 1] - ref).abs().max().item() <= 1e-3, i
    assert (out[2:] - _logits(base, ids[2:])).abs().max().item() <= 1e-3
