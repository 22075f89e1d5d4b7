"""Cross-entropy method over mixing weights α (Transformer²'s few-shot adaptation).

Sample a population around a mean, keep the elite fraction by fitness, refit mean and std to the elite,
repeat. Reference settings: population 32, elite ratio 0.2, 50 generations, initial mean 1/K, initial
std 0.5, α clamped to [0, 1] and not normalised. Seeded: the same inputs give the same α.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch


@dataclass
class CEMConfig:
    population: int = 32
    elite_ratio: float = 0.2
    generations: int = 50
    init_std: float = 0.5
    init_mean: float | None = None  # None: 1/K
    clamp: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def check(self) -> None:
        if self.population < 2 or not 0 < self.elite_ratio <= 1 or self.generations < 1 or self.init_std <= 0:
            raise ValueError("population >= 2, 0 < elite_ratio <= 1, generations >= 1, init_std > 0")
        if self.clamp[0] > self.clamp[1]:
            raise ValueError("clamp must be (low, high) with low <= high")


@dataclass
class CEMResult:
    best: torch.Tensor  # the best α seen, shape as requested
    best_fitness: float
    history: list[dict] = field(default_factory=list)  # per generation: best, mean fitness, std


async def cem(fitness: Callable[[torch.Tensor], Awaitable[torch.Tensor]], shape: tuple[int, ...], num_experts: int,
              cfg: CEMConfig, progress: Callable[[int, CEMResult], None] | None = None) -> CEMResult:
    """Maximise `fitness` (population (P, *shape) -> (P,) scores) over α of `shape`."""
    cfg.check()
    g = torch.Generator().manual_seed(cfg.seed)
    mean = torch.full(shape, cfg.init_mean if cfg.init_mean is not None else 1.0 / num_experts, dtype=torch.float64)
    std = torch.full(shape, cfg.init_std, dtype=torch.float64)
    n_elite = max(1, round(cfg.population * cfg.elite_ratio))
    result = CEMResult(mean.clone(), float("-inf"))
    for gen in range(cfg.generations):
        pop = mean + std * torch.randn((cfg.population, *shape), generator=g, dtype=torch.float64)
        pop = pop.clamp(*cfg.clamp)
        scores = (await fitness(pop)).to(torch.float64)  # (P,)
        order = scores.argsort(descending=True)
        elite = pop[order[:n_elite]]
        if float(scores[order[0]]) > result.best_fitness:
            result.best, result.best_fitness = pop[order[0]].clone(), float(scores[order[0]])
        mean = elite.mean(0)
        std = elite.std(0, unbiased=False) if n_elite > 1 else std * 0.5
        result.history.append({"generation": gen + 1, "best": result.best_fitness,
                               "mean": float(scores.mean()), "std": float(std.mean())})
        if progress is not None:
            progress(gen + 1, result)
    return result
