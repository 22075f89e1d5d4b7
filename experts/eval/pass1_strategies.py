"""Transformer²'s pass-1 strategies as evaluation strategies, built on the serving code of issue 5:
``prompt`` and ``cls_expert`` decide with ``experts.pass1.dispatch.Dispatcher`` (the same classification
prompt and label scoring as a live request), ``few_shot`` searches mixing weights once per task with
``experts.pass1.few_shot.FewShotSearch`` (CEM) and applies the mixture to every example.

That code talks to an asynchronous engine; ``SyncEngineAdapter`` gives it one over the synchronous
engine the evaluation drives, so every example's pass 1 of one call shares engine batches.

Few-shot shots: the first ``shots`` examples of the task's train split when it has one (ARC-Challenge), or
of its val split (the generated unseen tasks), else the last ``shots`` of its test split (MATH-500,
HumanEval); a shot that is among the evaluated examples is left out of the score (``held_out``), so no shot
is ever graded.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections import deque

from experts.eval.strategies import EvalContext, StrategyResult, StrategyUnavailable, register_strategy
from experts.tasks import Example, Task

TRAINED_TASKS = ("gsm8k", "mbpp", "arc-easy")  # whose experts few-shot mixes (a task's ``experts_from`` overrides)


class SyncEngineAdapter:
    """``async generate(request)`` over ``LLMEngine``: whichever waiting coroutine finds nothing to read
    runs one engine step and hands every output to its request's queue."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self._queues: dict[str, deque] = {}

    async def generate(self, req):
        q = self._queues[req.request_id] = deque()
        self.engine.add_request(req)
        await asyncio.sleep(0)  # let the other gathered requests join before the first step
        try:
            while True:
                while not q:
                    for out in self.engine.step():
                        self._queues[out.request_id].append(out)
                    await asyncio.sleep(0)
                out = q.popleft()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(req.request_id, None)


def _registry(ctx: EvalContext):
    from experts.store.registry import ExpertRegistry

    reg = ExpertRegistry()
    for name, expert in ctx.experts.items():
        reg.put(expert, {"kind": "svf", "category": ctx.categories.get(name, "other")})
    return reg


def _dispatch(strategy: str, ctx: EvalContext, task: Task, examples: list[Example]) -> StrategyResult:
    from experts.pass1.dispatch import Dispatcher

    disp = Dispatcher(SyncEngineAdapter(ctx.engine), _registry(ctx), guidelines=getattr(task, "guidelines", None))
    if strategy == "cls_expert" and disp.classifier_expert() is None:
        raise StrategyUnavailable("cls_expert needs an expert with category 'classifier' (--expert or --store)")
    if not disp.experts_by_category():
        raise StrategyUnavailable(f"{strategy} needs experts with categories (math, code, reasoning) loaded")

    async def decide_all():
        return await asyncio.gather(*(disp.decide(strategy, e.question) for e in examples))

    t0 = time.perf_counter()
    decisions = asyncio.run(decide_all())
    return StrategyResult([d.adaptation for d in decisions], chosen=[d.chosen for d in decisions],
                          pass1_seconds=time.perf_counter() - t0)


def _few_shot(ctx: EvalContext, task: Task, examples: list[Example]) -> StrategyResult:
    from experts.pass1.cem import CEMConfig
    from experts.pass1.few_shot import FewShotSearch, FewShotSpec, Shot

    trained = getattr(task, "experts_from", TRAINED_TASKS)
    names = list(dict.fromkeys(ctx.task_experts[t] for t in trained if ctx.task_experts.get(t) in ctx.experts))
    if len(names) < 2:
        raise StrategyUnavailable(f"few_shot needs at least two trained task experts ({', '.join(trained)})")
    k = int(ctx.options.get("shots", 10))
    own = next((s for s in ("train", "val") if s in task.splits), None)
    pool = task.load(ctx.data, own)[:k] if own else task.load(ctx.data, "test")[-k:]
    shots = [Shot(e.question, e.reference) for e in pool]
    shot_ids = {e.id for e in pool}
    cfg = CEMConfig(population=int(ctx.options.get("cem_population", 32)),
                    generations=int(ctx.options.get("cem_generations", 50)), seed=ctx.seed)
    # Fitness (option few_shot_fitness): "loglik" of the shots' reference answers, or "task", the task's own
    # scorer on greedy replies to the shots with the log-likelihood breaking ties, as the paper's CEM searches
    # on task performance. On the unseen miniature tasks loglik picked alpha near 0 (the experts answer
    # "55 + 5 = 60", the references say "The answer is 60."), leaving few-shot at base accuracy.
    by_task = ctx.options.get("few_shot_fitness", "loglik") == "task"
    spec = FewShotSpec(task.name, names, shots, cfg, fitness="exact_match" if by_task else "loglik")
    search = FewShotSearch(SyncEngineAdapter(ctx.engine), spec, [ctx.experts[n] for n in names],
                           judge=(lambda i, reply: task.score(pool[i], reply)) if by_task else None,
                           max_tokens=task.max_tokens)
    t0 = time.perf_counter()

    def progress(gen, res) -> None:  # a search takes minutes on a CPU: one line per generation
        print(f"  few-shot CEM {task.name}: generation {gen}/{cfg.generations}, best fitness {res.best_fitness:.3f}, "
              f"alpha {[round(a, 3) for a in res.best.reshape(-1).tolist()[:8]]} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    result = asyncio.run(search.run(progress))
    mix = search.adaptation(result.best, label=f"few_shot:{task.name}")
    return StrategyResult([mix] * len(examples), pass1_seconds=time.perf_counter() - t0,
                          held_out=[i for i, e in enumerate(examples) if e.id in shot_ids],
                          notes={"experts": names, "alpha": result.best.tolist(), "fitness": result.best_fitness,
                                 "shots": len(shots), "shots_from": own or "test (never scored)",
                                 "fitness_kind": "task" if by_task else "loglik",
                                 "population": cfg.population, "generations": cfg.generations})


def register() -> None:
    register_strategy("prompt", lambda c, t, e: _dispatch("prompt", c, t, e))
    register_strategy("cls_expert", lambda c, t, e: _dispatch("cls_expert", c, t, e))
    register_strategy("few_shot", _few_shot)


register()
