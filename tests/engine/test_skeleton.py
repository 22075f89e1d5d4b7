"""The host's skeleton of a model whose weights another engine holds: same fingerprint, same SAPT routing."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from adapters import SAPTBundle
from engine.loader import holds_weights, load_skeleton
from experts.pass1.resolver import sapt_attention
from experts.store.base_model import BaseModelInfo, model_fingerprint


def test_a_skeleton_fingerprints_and_routes_like_the_whole_model(smollm2_dir):
    whole = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    skeleton = load_skeleton(smollm2_dir, torch.bfloat16)
    assert holds_weights(whole) and not holds_weights(skeleton)
    # SmolLM2 ties lm_head to the embeddings: the tied weight is read through its source
    assert model_fingerprint(skeleton) == model_fingerprint(whole)
    assert BaseModelInfo.from_model(skeleton, "m").d_model == whole.config.hidden_size
    on_host = sum(p.numel() for p in skeleton.parameters() if not p.is_meta)
    assert on_host == whole.get_input_embeddings().weight.numel()  # nothing but the embeddings is loaded
    torch.manual_seed(0)
    bundle = SAPTBundle({"model.layers.0.self_attn.q_proj": (576, 576)}, d_model=576, num_tasks=3, rank=4)
    ids = [1, 42, 7, 99, 3]
    torch.testing.assert_close(sapt_attention(skeleton, bundle, ids), sapt_attention(whole, bundle, ids),
                               rtol=2e-2, atol=2e-3)  # bf16 embeddings against float32 ones
    assert skeleton.generation_config.eos_token_id == whole.generation_config.eos_token_id


def test_a_fingerprint_of_another_checkpoint_differs(smollm2_dir, tiny_llama_dir):
    assert model_fingerprint(load_skeleton(tiny_llama_dir)) != model_fingerprint(load_skeleton(smollm2_dir))


def test_both_engines_validate_through_one_protocol():
    from adapters.runtime import AdaptationRuntime
    from adapters.targets import Target
    from engine.contract import AdaptationCheck
    from engine.vllm.row_router import RowsView

    assert isinstance(RowsView([Target("m.gate_proj", "linear", 9, 6)], 8), AdaptationCheck)
    assert isinstance(AdaptationRuntime(torch.nn.Linear(2, 2)), AdaptationCheck)
