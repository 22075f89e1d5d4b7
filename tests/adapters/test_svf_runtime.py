"""SVF experts applied per batch row through the runtime, checked against plain reference models."""
import copy

import pytest
import torch

from adapters import Adaptation, SVFExpert, install
from adapters import layer as layer_mod
from adapters.svf import merged_weight
from tests.support.adapt import VOCAB, logits, neutral_expert, random_expert, tiny_model, with_merged_weights

ARCHS = ["llama", "qwen2", "gpt2"]


def _setup(arch, targets="mlp", dtype=torch.float32, **options):
    base = tiny_model(arch, dtype=dtype)
    model = copy.deepcopy(base)
    runtime = install(model, targets, None, progress=False, **options)
    return base, model, runtime


def _ids(batch=4, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(model, runtime, rows, ids):
    table = runtime.plan(rows)
    with torch.no_grad(), runtime.activate(table):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("parametrization", ["sakana", "direct"])
def test_neutral_expert_reproduces_base(arch, parametrization):
    base, model, runtime = _setup(arch, "all")
    ids = _ids()
    ref = logits(base, ids)
    neutral = Adaptation.expert(neutral_expert(runtime, parametrization))
    for rows in ([neutral] * 4, [neutral, None, neutral, None]):
        out = _run(model, runtime, rows, ids)
        assert (out - ref).abs().max().item() <= 1e-4
    assert (ref - _run(model, runtime, [Adaptation.expert(random_expert(runtime, "r", 0))] * 4, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_base_step_uses_plain_weights(arch, monkeypatch):
    base, model, runtime = _setup(arch, "all")
    ids = _ids()
    assert runtime.plan([None] * 4) is None

    def forbidden(*a, **k):
        raise AssertionError("factored path used in a base step")

    monkeypatch.setattr(layer_mod, "factored_linear", forbidden)
    with torch.no_grad(), runtime.activate(None):
        out = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, logits(base, ids))  # bit-identical: the same x Wᵀ + b ops
    assert set(model.state_dict()) == set(base.state_dict())  # factors are not in the state dict


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_and_factored_agree(arch):
    base, model, runtime = _setup(arch, "all", merge_after=10**9)
    ids = _ids()
    a = Adaptation.expert(random_expert(runtime, "x", seed=1))
    factored = _run(model, runtime, [a] * 4, ids)
    ref = logits(with_merged_weights(base, runtime, a), ids)
    assert (factored - logits(base, ids)).abs().max() > 1e-2  # the expert does something
    assert (factored - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("parametrization", ["sakana", "direct"])
def test_four_mixtures_in_one_batch_equal_rows_alone(arch, parametrization):
    base, model, runtime = _setup(arch, "mlp")
    experts = [random_expert(runtime, f"e{i}", seed=10 + i, parametrization=parametrization, scale=0.5)
               for i in range(3)]
    e0, e1, e2 = experts
    rows = [
        Adaptation.expert(e0),
        Adaptation.mixture({e0: 0.5, e1: 0.5}),
        Adaptation.mixture({e1: 0.2, e2: 0.9}),
        Adaptation.per_matrix_mixture(experts, torch.rand(3, len(runtime.targets)),
                                      [t.name for t in runtime.targets]),
    ]
    ids = _ids()
    out = _run(model, runtime, rows, ids)
    for i, a in enumerate(rows):
        alone = logits(with_merged_weights(base, runtime, a), ids[i:i + 1])
        assert (out[i:i + 1] - alone).abs().max().item() <= 1e-4, i
    assert (out[0] - out[1]).abs().max() > 1e-3  # rows really differ


def test_base_rows_in_a_mixed_batch():
    base, model, runtime = _setup("llama", "all")
    a = Adaptation.expert(random_expert(runtime, "x", seed=3))
    ids = _ids()
    out = _run(model, runtime, [None, a, None, a], ids)
    ref_base, ref_a = logits(base, ids), logits(with_merged_weights(base, runtime, a), ids)
    for i in (0, 2):
        diff = (out[i] - ref_base[i]).abs().max().item()
        assert diff <= 1e-4
    for i in (1, 3):
        assert (out[i] - ref_a[i]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_single_adaptation_switches_to_merged_weights(arch, monkeypatch):
    base, model, runtime = _setup(arch, "mlp", merge_after=3)
    n = len(runtime.targets)
    a = Adaptation.expert(random_expert(runtime, "x", seed=4))
    ids = _ids()
    ref = logits(with_merged_weights(base, runtime, a), ids)
    runtime.clear_caches()  # start without the merged weights the reference built
    factored_calls = []
    real = layer_mod.factored_linear
    monkeypatch.setattr(layer_mod, "factored_linear", lambda *x, **k: factored_calls.append(1) or real(*x, **k))
    table = runtime.plan([a] * 4)
    counts = []
    for _ in range(4):
        with torch.no_grad(), runtime.activate(table):
            out = model(input_ids=ids, use_cache=False).logits
        counts.append(len(factored_calls))
        assert (out - ref).abs().max().item() <= 1e-4
    assert counts == [n, 2 * n, 2 * n, 2 * n]  # every target factored twice, then merged from the 3rd step on
    assert table.layer_state[runtime.targets[0].name].merged is not None
    assert runtime.plan([a] * 2).layer_state[runtime.targets[0].name].merged is not None  # cached


def test_bf16_merged_neutral_keeps_weights():
    base, model, runtime = _setup("llama", "mlp", dtype=torch.bfloat16)
    merged = runtime.merged_weights(Adaptation.expert(neutral_expert(runtime)))
    for layer in runtime.layers:
        W = base.get_submodule(layer.name).weight.detach().float()
        # W + U diag(s − σ) Vᵀ: only float32 noise, where U diag(σ) Vᵀ in bf16 is off by ~1e-3 of |W|
        assert (merged[layer.name].float() - W).abs().max() <= 1e-6 * W.abs().max()
        naive = merged_weight(layer.U, layer.S, layer.Vh).float()
        assert (naive - W).abs().max() > 1e-4 * W.abs().max()


def test_scales_are_resolved_once_per_adaptation(monkeypatch):
    _, model, runtime = _setup("llama", "mlp")
    e = random_expert(runtime, "x", seed=5)
    calls = []
    from adapters.adaptation import SVFMixture

    real = SVFMixture.scales
    monkeypatch.setattr(SVFMixture, "scales", lambda self, s: calls.append(1) or real(self, s))
    for _ in range(3):  # equal content -> equal key, even for new objects
        runtime.plan([Adaptation.expert(e), None, Adaptation.mixture({e: 1.0})])
    assert len(calls) == 1
    runtime.max_resolved = 2
    for i in range(4):
        runtime.plan([Adaptation.mixture({e: 0.1 * (i + 1)})])
    assert len(runtime._resolved) == 2


def test_adaptation_keys_and_validation():
    _, model, runtime = _setup("llama", "mlp")
    e1, e2 = random_expert(runtime, "a", 1), random_expert(runtime, "b", 2)
    assert Adaptation.mixture({e1: 0.5, e2: 0.5}).key == Adaptation.mixture([(e1, 0.5), (e2, 0.5)]).key
    assert Adaptation.mixture({e1: 0.5, e2: 0.5}).key != Adaptation.mixture({e1: 0.5, e2: 0.6}).key
    assert Adaptation.expert(e1).key != Adaptation.expert(e2).key
    bad = SVFExpert("bad", {"model.layers.0.self_attn.q_proj": torch.zeros(32)})
    with pytest.raises(ValueError, match="not an installed target"):
        runtime.validate(Adaptation.expert(bad))
    short = SVFExpert("short", {runtime.targets[0].name: torch.zeros(5)})
    with pytest.raises(ValueError, match="has 5 values"):
        runtime.validate(Adaptation.expert(short))
    with pytest.raises(ValueError, match="parametrization"):
        Adaptation.mixture({e1: 1.0, random_expert(runtime, "d", 3, parametrization="direct"): 1.0})
    table = runtime.plan([Adaptation.expert(e1)] * 2)
    with pytest.raises(RuntimeError, match="rows"), torch.no_grad(), runtime.activate(table):
        model(input_ids=_ids(batch=3), use_cache=False)


def test_gradient_to_z_matches_finite_differences():
    # GPT-2: Llama's RMSNorm computes in float32 even for a float64 model, which hides the gradient
    # under float32 noise at the finite-difference step; GPT-2's LayerNorm stays in float64.
    base, model, runtime = _setup("gpt2", "all", dtype=torch.float64)
    names = [t.name for t in runtime.targets]
    g = torch.Generator().manual_seed(0)
    z0 = [0.3 * torch.randn(t.rank, generator=g, dtype=torch.float64) for t in runtime.targets]
    z1 = [0.3 * torch.randn(t.rank, generator=g, dtype=torch.float64) for t in runtime.targets]
    ids = _ids(batch=2, length=3)
    w = torch.randn(2, 3, VOCAB, generator=g, dtype=torch.float64)

    def loss(alpha, *zs):  # expert 0 is trained (z), expert 1 frozen; α of the mixture too
        trained = SVFExpert("t", dict(zip(names, zs)))
        frozen = SVFExpert("f", dict(zip(names, z1)))
        a = Adaptation.mixture([(trained, alpha[0]), (frozen, alpha[1])])
        with runtime.activate(runtime.plan([a, None])):
            return (model(input_ids=ids, use_cache=False).logits * w).sum()

    alpha = torch.tensor([0.7, 0.4], dtype=torch.float64, requires_grad=True)
    zs = [z.clone().requires_grad_(True) for z in z0[:2]] + z0[2:]  # two targets checked, rest fixed
    fn = lambda al, za, zb: loss(al, za, zb, *z0[2:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (alpha, *zs[:2]), eps=1e-6, atol=1e-6)
    assert runtime._resolved == {}  # trained adaptations are never cached


def test_sakana_scale_is_finite_for_every_finite_z_and_equals_the_plain_formula():
    """s = σ⊙m · Σσ/Σ(σ⊙m) with m = sigmoid(z): the plain quotient is 0/0 once every m underflows (z below
    about -100); the stable form stays finite, gives the limit where it is representable (equal z: the base
    σ), and the same values elsewhere."""
    from adapters.svf import svf_scale

    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(32, generator=g) * 3 + 0.01
    for z in (torch.full((32,), -200.0), torch.full((32,), -1e30), torch.linspace(-300, 5, 32)):
        s = svf_scale(sigma, z, "sakana")
        assert torch.isfinite(s).all() and float(s.sum()) == pytest.approx(float(sigma.sum()), rel=1e-5)
    assert torch.allclose(svf_scale(sigma, torch.full((32,), -200.0), "sakana"), sigma, rtol=1e-3)
    z = torch.randn(32, generator=g) * 3
    s64, z64 = sigma.double(), z.double()
    plain = s64 * torch.sigmoid(z64) * (s64.sum() / (s64 * torch.sigmoid(z64)).sum())
    assert torch.allclose(svf_scale(sigma, z, "sakana").double(), plain, rtol=1e-5)


def test_digest_follows_in_place_changes_until_frozen():
    _, _, runtime = _setup("llama", "mlp")
    e = random_expert(runtime, "a", 1)
    before = e.digest()
    with torch.no_grad():
        next(iter(e.z.values())).add_(1.0)  # as an optimizer step does
    trained = e.digest()
    assert trained != before
    assert e.freeze() is e and e.digest() == trained and not e.requires_grad
    other = random_expert(runtime, "a", 1)
    assert other.digest() == before  # the same content hashes alike, frozen or not
