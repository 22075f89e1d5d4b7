"""Per-row adaptation's tables and layer math (engine.vllm.rows) against the plain merged-weight reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.adaptation import Adaptation, SVFExpert
from adapters.sapt import row_lora_scale
from adapters.svd_cache import thin_svd
from adapters.svf import merged_weight, svf_scale, svf_scale_segments
from engine.vllm.rows import RowTables, adapt_layer, first_fit, write_bank

D = torch.float64


@pytest.mark.parametrize("p", ["sakana", "direct"])
def test_segment_scales_equal_the_per_matrix_scale(p):
    g = torch.Generator().manual_seed(0)
    sigmas = [torch.rand(k, generator=g, dtype=D) + 0.1 for k in (5, 3, 7)]
    zs = [torch.randn(2, k, generator=g, dtype=D) * 3 for k in (5, 3, 7)]
    seg = torch.cat([torch.full((s.shape[0],), i) for i, s in enumerate(sigmas)])
    got = svf_scale_segments(torch.cat(sigmas), torch.cat(zs, dim=1), seg, 3, p)
    want = torch.cat([torch.stack([svf_scale(s, z[r], p) for r in range(2)]) for s, z in zip(sigmas, zs)], dim=1)
    torch.testing.assert_close(got, want)


def test_first_fit_finds_gaps_and_refuses_overlap():
    assert first_fit([], 8, 16) == 0
    assert first_fit([(0, 8)], 8, 16) == 8
    assert first_fit([(0, 8), (8, 8)], 1, 16) is None
    assert first_fit([(0, 4), (8, 8)], 4, 16) == 4
    assert first_fit([(0, 4), (8, 8)], 5, 16) is None
    assert first_fit([(0, 4)], 4, 16, at=2) is None and first_fit([(0, 4)], 4, 16, at=4) == 4


class Fused(torch.nn.Module):
    """A stand-in for a vLLM layer holding gate and up fused, plus one unadapted matrix after them."""

    def __init__(self, W):
        super().__init__()
        self.weight = torch.nn.Parameter(W, requires_grad=False)

    def forward(self, x):
        return self.quant_method.apply(self, x)


def _setup(sapt_rank=6, rows=8):
    g = torch.Generator().manual_seed(1)
    d, outs = 6, {"m.gate_proj": 9, "m.up_proj": 9, "m.extra": 4}
    Ws = {n: torch.randn(o, d, generator=g, dtype=D) for n, o in outs.items()}
    layer = Fused(torch.cat(list(Ws.values())))
    adapted = ["m.gate_proj", "m.up_proj"]
    factors = {n: thin_svd(Ws[n]) for n in adapted}
    tables = RowTables({n: factors[n].S for n in adapted}, sapt_rank, rows, 64)
    pieces = [(n, layer.weight[sum(list(outs.values())[:i]):sum(list(outs.values())[:i + 1])])
              for i, n in enumerate(outs)]
    method = adapt_layer(layer, tables, pieces, {n: (factors[n].U, factors[n].Vh) for n in adapted}, set(outs))
    return layer, method, tables, Ws, factors, g


def _expert(name, factors, g, p="sakana", names=None):
    names = names or list(factors)
    return SVFExpert(name, {n: torch.randn(factors[n].S.shape[0], generator=g, dtype=D) for n in names}, p)


def test_every_row_gets_its_own_merged_weights_and_sapt_mixture():
    layer, method, tables, Ws, factors, g = _setup()
    assert layer.weight.numel() == 0  # W of the fused layer is served by the factors now
    e1, e2 = _expert("a", factors, g), _expert("b", factors, g)
    for e in (e1, e2):
        tables.put_expert(e.digest(), dict(e.z), e.parametrization)
    # a SAPT bundle of 2 tasks x r=2 on gate and extra, placed at bank offset 2
    A = {n: torch.randn(4, 6, generator=g, dtype=D) for n in ("m.gate_proj", "m.extra")}
    B = {n: torch.randn(Ws[n].shape[0], 4, generator=g, dtype=D) for n in A}
    place = tables.place_bundle("bundle", 4, 2, offset=2)
    for n in A:
        write_bank(layer, method, n, place, A[n], B[n])
    attn = [0.3, 0.7]
    mixes = [None, Adaptation.mixture({e1: 0.7, e2: 0.6}), Adaptation.mixture({e2: 1.0}),
             Adaptation.per_matrix_mixture([e1, e2], torch.tensor([[1.0, 0.2], [0.1, 0.9]], dtype=D),
                                           ["m.up_proj", "m.gate_proj"])]
    recipes = [None] + [{"svf": {"experts": [e.digest() for e in a.svf.experts], "alpha": a.svf.alpha.tolist(),
                                 "targets": list(a.svf.alpha_targets) if a.svf.alpha_targets else None}}
                        for a in mixes[1:]]
    recipes.append({"sapt": {"bundle": "bundle", "attention": attn}})
    recipes.append({**recipes[1], "sapt": {"bundle": "bundle", "attention": attn}})
    mixes += [None, mixes[1]]
    slots = [5, 0, 3, 7, 1, 2]  # request slots, in no particular order
    for slot, r in zip(slots, recipes):
        tables.admit(slot, r)
    counts = np.array([3, 1, 2, 1, 4, 2])
    n = int(counts.sum())
    tables.map_tokens(np.array(slots), counts, n + 3)
    assert tables.token_rows[n:n + 3].tolist() == [0, 0, 0]
    x = torch.randn(n + 3, 6, generator=g, dtype=D)
    y = layer(x)
    start = 0
    for i, (c, a) in enumerate(zip(counts, mixes)):
        xs = x[start:start + c]
        want = []
        scales = a.svf.scales({k: f.S for k, f in factors.items()}) if a is not None else {}
        for name, W in Ws.items():
            Wr = merged_weight(factors[name].U, scales[name], factors[name].Vh) if name in scales else W
            out = xs @ Wr.T
            if "sapt" in (recipes[i] or {}) and name in A:
                out = out + (xs @ A[name].T * row_lora_scale(torch.tensor(attn, dtype=D), 2)) @ B[name].T
            want.append(out)
        torch.testing.assert_close(y[start:start + c], torch.cat(want, dim=1), rtol=1e-5, atol=1e-5)  # fp32 scales
        start += c


def test_a_recycled_slot_keeps_nothing_of_its_last_request():
    layer, method, tables, Ws, factors, g = _setup()
    e = _expert("a", factors, g)
    tables.put_expert(e.digest(), dict(e.z), "sakana")
    place = tables.place_bundle("b", 4, 2, offset=0)
    write_bank(layer, method, "m.gate_proj", place, torch.ones(4, 6, dtype=D), torch.ones(9, 4, dtype=D))
    tables.admit(4, {"svf": {"experts": [e.digest()], "alpha": [1.0], "targets": None},
                     "sapt": {"bundle": "b", "attention": [0.5, 0.5]}})
    tables.admit(4, None)  # the slot's next request: the base model
    tables.map_tokens(np.array([4]), np.array([2]), 2)
    x = torch.randn(2, 6, generator=g, dtype=D)
    torch.testing.assert_close(layer(x), x @ torch.cat(list(Ws.values())).T)


def test_unregistered_experts_and_bundles_are_refused_not_served_as_another():
    _, _, tables, _, factors, g = _setup()
    with pytest.raises(KeyError):
        tables.admit(0, {"svf": {"experts": ["missing"], "alpha": [1.0], "targets": None}})
    with pytest.raises(KeyError):
        tables.admit(0, {"sapt": {"bundle": "missing", "attention": [1.0]}})
    with pytest.raises(ValueError, match="not free"):
        tables.place_bundle("x", 4, 2, offset=0)
        tables.place_bundle("y", 4, 2, offset=2)
    bad = SVFExpert("bad", {"m.gate_proj": torch.zeros(3)})
    with pytest.raises(ValueError, match="singular values"):
        tables.put_expert("bad", dict(bad.z), "sakana")


def test_without_svf_the_layer_keeps_w_and_one_gemm_serves_w_and_the_bank():
    """vllm_svf off: no factors, W kept inside [W | blockdiag(B)], each row its own SAPT mixture."""
    g = torch.Generator().manual_seed(3)
    d, outs = 6, {"m.gate_proj": 9, "m.up_proj": 7}
    Ws = {n: torch.randn(o, d, generator=g, dtype=D) for n, o in outs.items()}
    layer = Fused(torch.cat(list(Ws.values())))
    tables = RowTables({}, 4, 4, 16)
    pieces = [("m.gate_proj", layer.weight[:9]), ("m.up_proj", layer.weight[9:])]
    method = adapt_layer(layer, tables, pieces, {}, set(outs))
    assert method.merged and layer.weight.numel() == 0
    A = {n: torch.randn(4, d, generator=g, dtype=D) for n in outs}
    B = {n: torch.randn(o, 4, generator=g, dtype=D) for n, o in outs.items()}
    place = tables.place_bundle("b", 4, 2, offset=0)
    for n in outs:
        write_bank(layer, method, n, place, A[n], B[n])
    attns = {2: [0.9, 0.1], 0: [0.2, 0.8]}
    tables.admit_many([2, 0, 1], [{"sapt": {"bundle": "b", "attention": attns[2]}},
                                  {"sapt": {"bundle": "b", "attention": attns[0]}}, None])
    tables.map_tokens(np.array([2, 0, 1]), np.array([2, 1, 2]), 5)
    x = torch.randn(5, d, generator=g, dtype=D)
    y = layer(x)
    for t, slot in enumerate([2, 2, 0, 1, 1]):
        want = []
        for n in outs:
            out = x[t] @ Ws[n].T
            if slot in attns:
                out = out + (x[t] @ A[n].T * row_lora_scale(torch.tensor(attns[slot], dtype=D), 2)) @ B[n].T
            want.append(out)
        torch.testing.assert_close(y[t], torch.cat(want), rtol=1e-5, atol=1e-5)
    write_bank(layer, method, "m.gate_proj", place, None, None)
    write_bank(layer, method, "m.up_proj", place, None, None)
    torch.testing.assert_close(layer(x), x @ torch.cat(list(Ws.values())).T)


def test_admitting_a_step_at_once_writes_what_one_by_one_admission_writes():
    _, _, tables, _, factors, g = _setup()
    e1, e2, e3 = (_expert(n, factors, g) for n in "abc")
    for e in (e1, e2, e3):
        tables.put_expert(e.digest(), dict(e.z), e.parametrization)
    tables.place_bundle("b", 4, 2, offset=0)
    svf = lambda es, a, t=None: {"experts": [e.digest() for e in es], "alpha": a, "targets": t}  # noqa: E731
    recipes = [{"svf": svf([e1, e2], [0.3, 0.7])}, None, {"svf": svf([e1, e2], [1.0, 0.1])},
               {"svf": svf([e3], [[0.5, 2.0]], ["m.up_proj", "m.gate_proj"]), "sapt": {"bundle": "b", "attention": [1, 0]}},
               {"sapt": {"bundle": "b", "attention": [0.4, 0.6]}}, {"svf": svf([e2, e1], [0.7, 0.3])}]
    slots = [6, 1, 3, 0, 7, 2]
    for slot in range(8):  # every slot dirty first: admission must overwrite all of it
        tables.admit(slot, recipes[3])
    tables.admit_many(slots, recipes)
    batched = tables.scale.clone()
    for slot, r in zip(slots, recipes):
        tables.admit(slot, r)
    torch.testing.assert_close(tables.scale, batched)
    torch.testing.assert_close(batched[6], batched[2])  # the same mixture, experts listed in another order
    with pytest.raises(KeyError):  # an unregistered expert: nothing of the step is written
        tables.admit_many([4, 5], [None, {"svf": svf([e1], [1.0]) | {"experts": ["missing"]}}])
    torch.testing.assert_close(tables.scale, batched)


def test_the_compile_cache_key_tells_layouts_and_code_apart():
    from engine.vllm.rows_worker import RowsConfig

    keys = {RowsConfig().compile_key(), RowsConfig(svf=False).compile_key(), RowsConfig(targets="all").compile_key(),
            RowsConfig(sapt_rank=32).compile_key()}
    assert len(keys) == 4 and RowsConfig().compile_key() == RowsConfig().compile_key()


def test_a_server_without_svf_rows_refuses_svf_requests_and_serves_sapt():
    from adapters.targets import Target
    from engine.vllm.row_router import RowsView

    view = RowsView([Target("m.gate_proj", "linear", 9, 6)], 8, svf=False)
    e = SVFExpert("a", {"m.gate_proj": torch.zeros(6)})
    with pytest.raises(ValueError, match="vllm_svf off"):
        view.validate(Adaptation.mixture({e: 1.0}))


def test_the_sapt_only_layout_reads_full_shapes_from_one_rank(monkeypatch):
    """Without SVF no rank gathers whole matrices: the shape of each follows from its shard and the layout."""
    from types import SimpleNamespace

    from engine.vllm import rows_worker
    from engine.vllm.rows_worker import Sub, _full_shape

    class QKVParallelLinear(SimpleNamespace):
        pass

    qkv = QKVParallelLinear(tp_rank=1, tp_size=4, num_kv_head_replicas=2)
    down = SimpleNamespace(tp_rank=3, tp_size=4, row_parallel=True)
    monkeypatch.setattr(rows_worker, "_row_parallel", lambda layer: getattr(layer, "row_parallel", False))
    q, k = Sub("q_proj", 0, slice(0, 256)), Sub("k_proj", 1, slice(256, 320))
    assert _full_shape(qkv, q, torch.empty(256, 1024)) == (1024, 1024)  # query heads split over 4 ranks
    assert _full_shape(qkv, k, torch.empty(64, 1024)) == (128, 1024)  # key heads: 2 ranks hold each copy
    assert _full_shape(down, Sub("down_proj", None, slice(None)), torch.empty(1024, 896)) == (1024, 3584)
    single = SimpleNamespace()
    assert _full_shape(single, q, torch.empty(7, 5)) == (7, 5)
