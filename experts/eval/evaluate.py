"""Accuracy of one (task, strategy) pair on a held-out split: pass 1 (the strategy) picks each example's
adaptation, pass 2 generates every reply greedily in engine batches, the task's scorer grades them.

Returns a JSON-ready result: accuracy with its 95% Wilson interval, the pass-1 classification accuracy
when the strategy reports its choices, timings, and one record per example (for inspection).
"""
from __future__ import annotations

import time

from engine.contract import SamplingParams
from experts.eval import pass1_strategies  # noqa: F401  (registers prompt, cls_expert, few_shot)
from experts.eval.stats import accuracy_cell
from experts.eval.strategies import EvalContext, get_strategy
from experts.tasks import Task
from experts.train.rollout import generate


def evaluate(ctx: EvalContext, task: Task, strategy: str, *, split: str = "test", limit: int | None = None,
             max_tokens: int | None = None) -> dict:
    examples = task.load(ctx.data, split)
    examples = examples[:limit] if limit else examples
    max_tokens = max_tokens or task.max_tokens
    room = ctx.engine.config.max_model_len - max_tokens
    prompts = [task.prompt_ids(ctx.base.tokenizer, e) for e in examples]
    t0 = time.perf_counter()
    plan = get_strategy(strategy)(ctx, task, examples)
    t1 = time.perf_counter()
    held = set(plan.held_out)
    scored = [i for i in range(len(examples)) if i not in held]
    kept = [i for i in scored if len(prompts[i]) <= room]  # too long for the engine: counted wrong
    gens = generate(ctx.engine, [prompts[i] for i in kept], [plan.adaptations[i] for i in kept],
                    [SamplingParams(max_tokens=max_tokens, temperature=0.0)] * len(kept))
    t2 = time.perf_counter()
    texts = {i: "" for i in scored}
    verdicts = {i: False for i in scored}
    texts.update((i, g.text) for i, g in zip(kept, gens))
    verdicts.update(zip(kept, task.score_many([examples[i] for i in kept], [texts[i] for i in kept])))
    t3 = time.perf_counter()
    result = {"task": task.name, "strategy": strategy, "split": split,
              **accuracy_cell(sum(verdicts.values()), len(scored)), "held_out": len(held),
              "skipped_too_long": len(scored) - len(kept), "max_tokens": max_tokens,
              "generated_tokens": sum(len(g.token_ids) for g in gens),
              "seconds": {"pass1": round(plan.pass1_seconds or (t1 - t0), 2), "generate": round(t2 - t1, 2),
                          "score": round(t3 - t2, 2)}, "notes": plan.notes}
    if plan.chosen is not None:
        chosen = [plan.chosen[i] for i in scored]
        result["pass1"] = {"expected": task.category, **accuracy_cell(sum(c == task.category for c in chosen),
                                                                      len(chosen)),
                           "chosen": {c: chosen.count(c) for c in sorted(set(chosen))}}
    result["samples"] = [{"id": examples[i].id, "correct": verdicts[i], "reply": texts[i][:2000],
                          "parsed": _jsonable(task.parse(examples[i], texts[i])),
                          "chosen": plan.chosen[i] if plan.chosen else None} for i in scored]
    return result


def _jsonable(v):
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)
