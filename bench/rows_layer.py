"""One MLP block of per-row adaptation (engine/vllm/rows.py) against the plain one, kernel time only.

    python bench/rows_layer.py                      # the embedded model's MLP shape, on this machine's device
    python bench/rows_layer.py --shape llama3-8b    # Llama-3-8B's MLP (4096 -> 2 x 14336 -> 4096)

Each variant runs gate_up, SiLU-and-multiply and down as vLLM's layers do, compiled (torch.compile) and, on
a GPU, captured in a CUDA graph, at decode-like (256 tokens) and prefill-like (4,096 tokens) step sizes,
every token in its own row (256 distinct adaptations):

  plain       y = x Wᵀ (stock vLLM's MLP)
  rows        SVF on both matrices (U, V; W dropped) and the SAPT bank beside them (rank 64)
  sapt-only   W kept, the SAPT bank beside it (vllm_svf off)

Every variant is first checked against the merged-weight reference of a few rows (float32). Reported: time
per step and its ratio to plain measured in the same run, the bytes each reads, peak GPU memory, peak RSS.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapters.svd_cache import thin_svd  # noqa: E402
from bench.common import machine, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.vllm.rows import RowTables, adapt_layer, layer_bytes, write_bank  # noqa: E402

SHAPES = {"smollm2": (576, 1536), "llama3-8b": (4096, 14336)}


class Layer(torch.nn.Module):
    def __init__(self, W):
        super().__init__()
        self.weight = torch.nn.Parameter(W, requires_grad=False)


def build(d: int, f: int, rows: int, tokens: int, svf: bool, bank: int, dev, dtype, seed=0):
    """(gate_up layer, down layer, their methods, tables, the plain weights) with random experts and bundle."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Ws = {"gate": torch.randn(f, d, generator=g) / d ** 0.5, "up": torch.randn(f, d, generator=g) / d ** 0.5,
          "down": torch.randn(d, f, generator=g) / f ** 0.5}
    Ws = {n: w.to(dev, dtype) for n, w in Ws.items()}
    factors = {n: thin_svd(w) for n, w in Ws.items()} if svf else {}
    tables = RowTables({n: factors[n].S.float() for n in Ws} if svf else {}, bank, rows, tokens, dev)
    gu = Layer(torch.cat([Ws["gate"], Ws["up"]]))
    dn = Layer(Ws["down"].clone())
    fac = {n: (f_.U, f_.Vh) for n, f_ in factors.items()}
    m_gu = adapt_layer(gu, tables, [("gate", gu.weight[:f]), ("up", gu.weight[f:])], fac, {"gate", "up"})
    m_dn = adapt_layer(dn, tables, [("down", dn.weight)], fac, {"down"})
    if bank:
        place = tables.place_bundle("b", bank, bank // 4, 0)
        for layer, method, name, (o, i) in ((gu, m_gu, "gate", (f, d)), (gu, m_gu, "up", (f, d)),
                                            (dn, m_dn, "down", (d, f))):
            write_bank(layer, method, name, place, (torch.randn(bank, i, generator=g) / i ** 0.5).to(dev, dtype),
                       (torch.randn(o, bank, generator=g) * 0.02).to(dev, dtype))
    if svf:
        for e in range(4):
            tables.put_expert(f"e{e}", {n: 0.5 * torch.randn(factors[n].S.shape[0], generator=g) for n in Ws},
                              "sakana")
    for r in range(rows):
        alpha = np.random.default_rng(r).dirichlet(np.ones(4)).tolist()
        recipe = {}
        if svf:
            recipe["svf"] = {"experts": ["e0", "e1", "e2", "e3"], "alpha": alpha, "targets": None}
        if bank:
            recipe["sapt"] = {"bundle": "b", "attention": alpha}
        tables.admit(r, recipe or None)
    return gu, dn, m_gu, m_dn, tables, Ws


def mlp_rows(gu, dn, m_gu, m_dn):
    def run(x):
        y = m_gu.apply(gu, x)
        n = y.shape[-1] // 2
        return m_dn.apply(dn, F.silu(y[:, :n]) * y[:, n:])
    return run


def mlp_plain(Ws):
    W_gu = torch.cat([Ws["gate"], Ws["up"]])
    W_dn = Ws["down"]

    def run(x):
        y = F.linear(x, W_gu)
        n = y.shape[-1] // 2
        return F.linear(F.silu(y[:, :n]) * y[:, n:], W_dn)
    return run


def reference(gu, dn, m_gu, m_dn, tables, x, token: int) -> torch.Tensor:
    """The merged-weight MLP of ``token``'s row in float32, from the layers' own buffers."""
    row = int(tables.token_rows[token])
    s = tables.scale[row].float()

    def merged(layer, method, j):
        p = method.pieces[j]
        cols = layer.t2_cols[p.cols[0]:p.cols[1]]
        D = layer.t2_down[p.cols[0]:p.cols[1]].float()
        if method.merged:
            start = sum(q.width for q in method.pieces[:j])
            up = layer.t2_up[start:start + p.width].float()
            W, M = up[:, :up.shape[1] - method.pieces[-1].cols[1]], up[:, up.shape[1] - method.pieces[-1].cols[1]:]
            M = M[:, p.cols[0]:p.cols[1]]
            return W + (M * s[cols]) @ D
        up = getattr(layer, f"t2_up{j}").float()
        return (up * s[cols]) @ D

    W_gu = torch.cat([merged(gu, m_gu, j) for j in range(len(m_gu.pieces))])
    W_dn = merged(dn, m_dn, 0)
    xt = x[token:token + 1].float()
    y = xt @ W_gu.T
    n = y.shape[-1] // 2
    return (F.silu(y[:, :n]) * y[:, n:]) @ W_dn.T


def timed(fn, x, dev, iters: int) -> float:
    """Seconds per call of ``fn(x)``: compiled, CUDA-graph replayed on a GPU."""
    fn = torch.compile(fn, fullgraph=True, dynamic=False)
    for _ in range(3):
        fn(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(x)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--rows", type=int, default=256, help="distinct adaptations (request slots)")
    ap.add_argument("--bank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=0, help="timed calls (0: 50 on a GPU, 5 on the CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    iters = args.iters or (50 if dev.type == "cuda" else 5)
    d, f = SHAPES[args.shape]
    T_max = max(args.tokens)
    result = {"bench": "rows_layer", "shape": args.shape, "machine": machine(), "args": vars(args), "rows": []}
    variants = {"rows": (True, args.bank), "sapt-only": (False, args.bank)}
    built = {}
    for name, (svf, bank) in variants.items():
        print(f"building {name} ({args.shape}) ...", flush=True)
        built[name] = build(d, f, args.rows, T_max, svf, bank, dev, dtype)
    plain_w = built["rows"][5]
    g = torch.Generator(device="cpu").manual_seed(1)
    for T in args.tokens:
        x = torch.randn(T, d, generator=g).to(dev, dtype)
        counts = np.full(args.rows, T // args.rows)
        counts[: T % args.rows] += 1
        base = timed(mlp_plain(plain_w), x, dev, iters)
        result["rows"].append({"tokens": T, "variant": "plain", "ms": base * 1e3, "ratio": 1.0})
        for name, (gu, dn, m_gu, m_dn, tables, _) in built.items():
            tables.map_tokens(np.arange(args.rows), counts, T)
            fn = mlp_rows(gu, dn, m_gu, m_dn)
            with torch.no_grad():
                y = fn(x)
                worst = 0.0
                for token in (0, T // 2, T - 1):
                    want = reference(gu, dn, m_gu, m_dn, tables, x, token)
                    worst = max(worst, float((y[token].float() - want[0]).abs().max() / want.abs().max()))
            tol = 0.05 if dtype == torch.bfloat16 else 1e-4
            if worst > tol:
                raise SystemExit(f"{name}: rows differ from their merged-weight reference by {worst:.3g} (> {tol})")
            t = timed(fn, x, dev, iters)
            sizes = [layer_bytes(gu, m_gu), layer_bytes(dn, m_dn)]
            result["rows"].append({"tokens": T, "variant": name, "ms": t * 1e3, "ratio": t / base,
                                   "max_rel_err": worst,
                                   "weight_mb": sum(sum(s.values()) for s in sizes) / 2**20})
            print(f"T={T} {name}: {t * 1e3:.3f} ms, {t / base:.3f}x plain ({base * 1e3:.3f} ms), "
                  f"max rel err {worst:.2g}", flush=True)
    result["plain_weight_mb"] = sum(w.numel() * w.element_size() for w in plain_w.values()) / 2**20
    result["peak_rss_mb"] = round(peak_rss_mb())
    result["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    print_table(result["rows"], ["tokens", "variant", "ms", "ratio", "max_rel_err", "weight_mb"])
    print(f"peak RSS {result['peak_rss_mb']} MB, peak GPU memory {result['device_peak_mb']} MB")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
