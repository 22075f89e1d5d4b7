"""Target discovery across architectures and target sets."""
import pytest
import torch

from adapters.targets import find_targets, weight_matrix
from tests.support.adapt import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_family_sets(arch):
    model = tiny_model(arch)
    mlp = find_targets(model)  # default "mlp"
    assert [t.name for t in mlp[:3]] == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(mlp) == 6 and all(t.kind == "linear" for t in mlp)
    gate = mlp[0]
    assert (gate.out_features, gate.in_features, gate.rank) == (48, 32, 32)
    attn = find_targets(model, "attn")
    assert [t.name.rsplit(".", 1)[1] for t in attn[:4]] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    k_proj = attn[1]
    assert (k_proj.out_features, k_proj.in_features) == (16, 32)  # GQA: 2 kv heads of 8
    both = find_targets(model, "all")
    assert len(both) == 14 and both[0].name == "model.layers.0.self_attn.q_proj"  # module order
    assert "lm_head" not in {t.name for t in both}


def test_gpt2_conv1d_targets_are_transposed():
    model = tiny_model("gpt2")
    names = [t.name for t in find_targets(model, "all")]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    mlp = find_targets(model, "mlp")
    assert [t.name for t in mlp[:2]] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    c_fc = mlp[0]
    assert c_fc.kind == "conv1d" and (c_fc.out_features, c_fc.in_features) == (128, 32)
    module = model.get_submodule(c_fc.name)
    assert module.weight.shape == (32, 128)
    x = torch.randn(3, 32)
    torch.testing.assert_close(module(x), x @ weight_matrix(module.weight, "conv1d").t() + module.bias)


def test_explicit_names_and_errors():
    model = tiny_model("llama")
    picked = find_targets(model, ["q_proj", "model.layers.1.mlp.down_proj"])
    assert [t.name for t in picked] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                         "model.layers.1.mlp.down_proj"]
    assert len(find_targets(model, ["mlp", "v_proj"])) == 8
    with pytest.raises(ValueError, match="matched no linear"):
        find_targets(model, ["q_proj", "nonexistent_proj"])
