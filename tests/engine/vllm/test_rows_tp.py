"""Tensor-parallel rows on the CPU: two torch.distributed (gloo) ranks each install the row-adapted layers on
their shard of a column-parallel layer (gate and up fused, output rows split) and a row-parallel one (down,
input columns split), as vLLM's workers do, gathering the full matrices for the SVD and keeping their shards of
U, Vᵀ, A and B. Every rank's outputs put back together (joined for column-parallel, summed for row-parallel)
must equal the same rows on one unsharded rank, and the plain merged-weight reference."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from adapters.sapt import row_lora_scale
from adapters.svd_cache import thin_svd
from adapters.svf import merged_weight, svf_scale

D_IN, D_MID, TASKS, R = 8, 12, 2, 2  # hidden, MLP width, SAPT tasks x rank
NAMES = ("l.mlp.gate_proj", "l.mlp.up_proj", "l.mlp.down_proj")
ALPHA = [0.7, 0.5]
ATTN = [0.25, 0.75]


class Layer(torch.nn.Module):
    """A vLLM-like linear layer as rank ``tp_rank`` of ``tp_size`` holds it."""

    def __init__(self, weight, tp_rank, tp_size, output_sizes=None, row_parallel=False):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.tp_rank, self.tp_size, self.row_parallel = tp_rank, tp_size, row_parallel
        if output_sizes is not None:
            self.output_sizes = output_sizes


def weights():
    g = torch.Generator().manual_seed(0)
    W = {NAMES[0]: torch.randn(D_MID, D_IN, generator=g), NAMES[1]: torch.randn(D_MID, D_IN, generator=g),
         NAMES[2]: torch.randn(D_IN, D_MID, generator=g)}
    z = [{n: torch.randn(min(W[n].shape), generator=g) for n in NAMES} for _ in ALPHA]
    bank = {n: (0.5 * torch.randn(TASKS * R, W[n].shape[1], generator=g),
                0.5 * torch.randn(W[n].shape[0], TASKS * R, generator=g)) for n in NAMES}
    x = torch.randn(5, D_IN, generator=g)
    h = torch.randn(5, D_MID, generator=g)  # the down projection's input
    return W, z, bank, x, h


def run_rank(rank: int, tp: int, folder: str) -> None:
    """Rank ``rank`` of ``tp``: install, register, admit, run both layers; save this rank's outputs."""
    from engine.vllm import rows_worker
    from engine.vllm.layers import shard_rows
    from engine.vllm.rows_worker import RowsConfig, Sub, WorkerRows

    if tp > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=tp)
    rows_worker._row_parallel = lambda layer: layer.row_parallel  # vLLM's RowParallelLinear, without vLLM
    W, z, bank, x, h = weights()
    gate, up, down = NAMES
    up_layer = Layer(torch.cat([W[gate].chunk(tp)[rank], W[up].chunk(tp)[rank]]), rank, tp, [D_MID, D_MID])
    down_layer = Layer(W[down].chunk(tp, dim=1)[rank], rank, tp, row_parallel=True)
    found = [(up_layer, [Sub(n, i, shard_rows(up_layer, i)) for i, n in enumerate((gate, up))], [gate, up]),
             (down_layer, [Sub(down, None, slice(None))], [down])]
    rows = WorkerRows.install(found, RowsConfig(targets="mlp", sapt_rank=TASKS * R, svf=True), slots=4, max_tokens=8)
    for i, zi in enumerate(z):
        rows.tables.put_expert(f"e{i}", zi, "sakana")
    path = f"{folder}/bundle-{rank}.safetensors"
    save_file({f"{n}.{k}": t.contiguous() for n, (A, B) in bank.items() for k, t in (("A", A), ("B", B))}, path)
    rows.put_bundle("b", path, R, 0)
    recipes = [None, {"svf": {"experts": ["e0", "e1"], "alpha": ALPHA, "targets": None}},
               {"sapt": {"bundle": "b", "attention": ATTN}},
               {"svf": {"experts": ["e0", "e1"], "alpha": ALPHA, "targets": None},
                "sapt": {"bundle": "b", "attention": ATTN}}]
    rows.tables.admit_many([0, 1, 2, 3], recipes)
    rows.tables.map_tokens(np.array([0, 1, 2, 3]), np.array([2, 1, 1, 1]), 5)  # rows of the 5 tokens
    with torch.no_grad():
        y_up = up_layer.quant_method.apply(up_layer, x)
        y_down = down_layer.quant_method.apply(down_layer, h.chunk(tp, dim=1)[rank])
    torch.save({"up": y_up, "down": y_down}, f"{folder}/out-{tp}-{rank}.pt")
    if tp > 1:
        dist.destroy_process_group()


def reference(W, z, bank, x, h):
    """Plain per-token math: W' = U diag(σ ⊙ m′) Vᵀ of the token's SVF mixture, plus its SAPT mixture."""
    token_rows = [0, 0, 1, 2, 3]
    svf_rows, sapt_rows = {1, 3}, {2, 3}
    outs = {}
    for key, names, inp in (("up", NAMES[:2], x), ("down", NAMES[2:], h)):
        per_token = []
        for t, row in enumerate(token_rows):
            parts = []
            for n in names:
                f = thin_svd(W[n].double())
                Wn = W[n].double()
                if row in svf_rows:
                    zmix = sum(a * zi[n].double() for a, zi in zip(ALPHA, z))
                    Wn = merged_weight(f.U, svf_scale(f.S, zmix, "sakana"), f.Vh)
                y = inp[t].double() @ Wn.T
                if row in sapt_rows:
                    A, B = bank[n]
                    y = y + (inp[t].double() @ A.double().T * row_lora_scale(torch.tensor(ATTN, dtype=torch.float64), R)) @ B.double().T
                parts.append(y)
            per_token.append(torch.cat(parts))
        outs[key] = torch.stack(per_token)
    return outs


def test_two_gloo_ranks_give_the_unsharded_rows(tmp_path):
    folder = str(tmp_path)
    run_rank(0, 1, folder)  # one unsharded rank
    mp.spawn(run_rank, args=(2, folder), nprocs=2, join=True)
    one = torch.load(f"{folder}/out-1-0.pt")
    parts = [torch.load(f"{folder}/out-2-{r}.pt") for r in range(2)]
    # column-parallel: each rank holds half of gate's rows and half of up's, in that order
    half = D_MID // 2
    up = torch.cat([torch.cat([p["up"][:, :half] for p in parts], dim=1),
                    torch.cat([p["up"][:, half:] for p in parts], dim=1)], dim=1)
    down = parts[0]["down"] + parts[1]["down"]  # row-parallel: partial sums, reduced
    torch.testing.assert_close(up, one["up"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(down, one["down"], rtol=1e-4, atol=1e-4)
    want = reference(*weights())
    torch.testing.assert_close(one["up"].double(), want["up"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(down.double(), want["down"], rtol=1e-4, atol=1e-4)
    # the adaptations change the outputs (the check is not passing by serving the base model)
    W, _, _, x, _ = weights()
    base = x @ torch.cat([W[NAMES[0]], W[NAMES[1]]]).T
    assert all((up[t] - base[t]).abs().max() > 0.1 for t in (2, 3, 4))
    torch.testing.assert_close(up[:2], base[:2], rtol=1e-4, atol=1e-4)
