"""CEM: recovers a known optimum, is seeded, and evaluates whole populations at once."""
from __future__ import annotations

import asyncio

import torch

from experts.pass1.cem import CEMConfig, cem


def run(fitness, shape, k, cfg):
    return asyncio.run(cem(fitness, shape, k, cfg))


def test_recovers_known_optimum_per_expert_and_per_matrix():
    target = torch.tensor([0.8, 0.1, 0.45], dtype=torch.float64)
    calls = []

    async def fitness(pop):  # (P, 3) -> (P,): a smooth bowl with its peak at `target`
        calls.append(pop.shape[0])
        return -((pop - target) ** 2).sum(-1)

    res = run(fitness, (3,), 3, CEMConfig(population=32, generations=30, seed=1))
    assert torch.allclose(res.best, target, atol=0.03), res.best
    assert calls == [32] * 30  # one call per generation with the whole population
    assert res.history[-1]["best"] >= res.history[0]["best"]

    target2 = torch.tensor([[0.2, 0.9], [0.7, 0.0]], dtype=torch.float64)

    async def fitness2(pop):
        return -((pop - target2) ** 2).flatten(1).sum(-1)

    res2 = run(fitness2, (2, 2), 2, CEMConfig(population=48, generations=40, seed=0))
    assert torch.allclose(res2.best, target2, atol=0.05), res2.best
    assert float(res2.best.min()) >= 0.0 and float(res2.best.max()) <= 1.0  # clamped


def test_same_seed_same_alpha_different_seed_differs():
    async def noisy(pop):
        return -(pop - 0.3).abs().sum(-1) + 0.01 * torch.sin(50 * pop).sum(-1)

    a = run(noisy, (4,), 4, CEMConfig(population=16, generations=5, seed=7)).best
    b = run(noisy, (4,), 4, CEMConfig(population=16, generations=5, seed=7)).best
    c = run(noisy, (4,), 4, CEMConfig(population=16, generations=5, seed=8)).best
    assert torch.equal(a, b) and not torch.equal(a, c)
