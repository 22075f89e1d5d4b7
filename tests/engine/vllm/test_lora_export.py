"""SAPT mixtures as LoRA adapters for vLLM: the folding math against the native engine's own computations
(float64), and the PEFT folder vLLM reads."""
from __future__ import annotations

import json

import pytest
import torch

from adapters import Adaptation, SAPTBundle
from adapters.lora_export import LoraFactors, sapt_lora
from engine.vllm.peft_folder import PEFT_PREFIX, REPORT_FILE, read_peft_adapter, write_peft_adapter


def random_bundle(runtime, tasks: int = 3, rank: int = 4, seed: int = 0) -> SAPTBundle:
    torch.manual_seed(seed)
    targets = {t.name: (t.out_features, t.in_features) for t in runtime.targets
               if t.name.endswith(("q_proj", "v_proj"))}
    bundle = SAPTBundle(targets, d_model=64, num_tasks=tasks, rank=rank).double()
    with torch.no_grad():
        for task in bundle.tasks:
            for B in task.B:  # trained blocks: B is no longer zero
                B.normal_(0, 0.2)
    return bundle


def test_sapt_lora_is_the_native_mixture(tiny64):
    model, rt = tiny64
    bundle = random_bundle(rt)
    attn = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 0)
    a = Adaptation.sapt_weights(bundle, attn)
    folded = {}
    for i, (name, (A_cat, B_cat)) in enumerate(bundle.stacked_lora().items()):
        f = folded[name] = sapt_lora(A_cat, B_cat, attn, bundle.rank)
        expected = sum(attn[t] * bundle.scaling * (task.B[i] @ task.A[i]) for t, task in enumerate(bundle.tasks))
        torch.testing.assert_close(f.B @ f.A, expected.detach(), atol=1e-12, rtol=0)
    # The model with W + B A gives what the native engine's per-row SAPT path gives.
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with rt.activate(rt.plan([a])):
            native = model(ids).logits
        modules = dict(model.named_modules())
        saved = {n: modules[n].weight.clone() for n in folded}
        try:
            for n, f in folded.items():
                modules[n].weight += f.B @ f.A
            merged = model(ids).logits
        finally:
            for n, w in saved.items():
                modules[n].weight.copy_(w)
    # (the native path mixes the attention in float32: agreement to its precision)
    torch.testing.assert_close(merged, native, atol=1e-5, rtol=0)


def test_peft_folder_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    loras = {
        "model.layers.0.self_attn.q_proj": LoraFactors(torch.randn(6, 16, generator=g), torch.randn(16, 6, generator=g)),
        "model.layers.0.mlp.down_proj": LoraFactors(torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g)),
        "model.layers.1.mlp.up_proj": LoraFactors(torch.zeros(0, 16), torch.zeros(32, 0)),  # no change: left out
    }
    folder = write_peft_adapter(tmp_path / "a", loras, "base-model", torch.bfloat16, report={"svf": None, "sapt_rank": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing half-written left behind
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 6 and config["lora_alpha"] == 6  # scaling 1
    assert config["target_modules"] == ["down_proj", "q_proj"] and config["bias"] == "none"
    assert json.loads((folder / REPORT_FILE).read_text()) == {"svf": None, "sapt_rank": 6}
    config2, back = read_peft_adapter(folder)
    assert config2 == config and set(back) == set(loras) - {"model.layers.1.mlp.up_proj"}
    for name, f in back.items():
        assert f.A.dtype == torch.bfloat16
        torch.testing.assert_close(f.A.float(), loras[name].A.bfloat16().float())
        torch.testing.assert_close(f.B.float(), loras[name].B.bfloat16().float())
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    # PEFT's names: vLLM strips the prefix and matches q_proj / down_proj to its (packed) modules.
    assert keys[0] == f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"
    assert all(k.startswith(PEFT_PREFIX + "model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    with pytest.raises(ValueError):
        write_peft_adapter(tmp_path / "b", {"x.q_proj": LoraFactors(torch.zeros(0, 4), torch.zeros(4, 0))},
                           "m", torch.float32)
