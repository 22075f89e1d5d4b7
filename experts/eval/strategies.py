"""How each example of an evaluation is adapted: the strategy decides an ``Adaptation`` (or None, the
base weights) per example before pass 2 generates the replies.

Built in: ``base`` (no adaptation) and ``expert`` (the SVF expert trained on the task itself).
The pass-1 strategies of Transformer² (``prompt``, ``cls_expert``, ``few_shot``) register themselves
from ``experts/eval/pass1_strategies.py``, which runs the serving code of ``experts.pass1``.
The hook is ``register_strategy(name, fn)`` with

    fn(ctx: EvalContext, task: Task, examples: list[Example]) -> StrategyResult

(one adaptation per example; ``chosen``: the pass-1 category per example, which gives the
classification accuracy). A strategy that cannot run raises ``StrategyUnavailable``; the table then
marks its cells with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from adapters import Adaptation, SVFExpert
from experts.tasks import Example, Task

PASS1 = ("prompt", "cls_expert", "few_shot")


class StrategyUnavailable(RuntimeError):
    """The strategy's implementation (or what it needs, e.g. an expert) is missing."""


@dataclass
class EvalContext:
    base: Any  # experts.train.model.BaseModel: model, tokenizer, runtime
    engine: Any  # engine.native.llm_engine.LLMEngine over that model
    experts: dict[str, SVFExpert]  # every loaded expert by name
    categories: dict[str, str]  # expert name -> category (math, code, reasoning, classifier, ...)
    task_experts: dict[str, str]  # task name -> name of the expert trained on it (strategy "expert")
    data: str  # data root (few-shot strategies draw their shots from a task's non-test split)
    seed: int = 0
    options: dict = field(default_factory=dict)  # strategy settings: shots, cem_population, cem_generations


@dataclass
class StrategyResult:
    adaptations: list[Adaptation | None]  # one per example, in order
    chosen: list[str] | None = None  # pass-1 decision per example (a category, "other" = base)
    pass1_seconds: float = 0.0
    held_out: list[int] = field(default_factory=list)  # examples the strategy used (few-shot shots): not scored
    notes: dict = field(default_factory=dict)  # anything worth reporting (CEM weights, ...)


StrategyFn = Callable[[EvalContext, Task, "list[Example]"], StrategyResult]
_REGISTRY: dict[str, StrategyFn] = {}


def base_strategy(ctx: EvalContext, task: Task, examples: list[Example]) -> StrategyResult:
    return StrategyResult([None] * len(examples))


def expert_strategy(ctx: EvalContext, task: Task, examples: list[Example]) -> StrategyResult:
    name = ctx.task_experts.get(task.name)
    if name is None or name not in ctx.experts:
        raise StrategyUnavailable(f"no expert trained on {task.name} is loaded (--expert {task.name}=NAME|FILE)")
    return StrategyResult([Adaptation.expert(ctx.experts[name])] * len(examples))


def register_strategy(name: str, fn: StrategyFn) -> None:
    _REGISTRY[name] = fn


register_strategy("base", base_strategy)
register_strategy("expert", expert_strategy)


def get_strategy(name: str) -> StrategyFn:
    """The strategy registered as ``name`` (the pass-1 ones register when ``pass1_strategies`` is imported,
    as ``evaluate`` does)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
