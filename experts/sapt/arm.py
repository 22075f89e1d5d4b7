"""ARM (attentive reflection, REFERENCE.md §2): pseudo-inputs of a learned task, made by a generator.

After a task is learned, a generator (a LoRA of the same shape, its own one-task bundle) learns to write
that task's requests from a trigger line; sampling it gives the pseudo-inputs (``pseudo_fraction`` of
the task's training size) that later tasks replay through the router. Only the inputs are kept: ARM
pulls the attention on them back to the stored mean vector and never needs an answer.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from adapters import SAPTBundle
from engine.contract import SamplingParams
from experts.sapt.blocks import adam, row_adaptations, train_steps
from experts.sapt.data import TaskData, derive_seed, reply_ids
from experts.tasks import Example
from experts.train.rollout import generate

log = logging.getLogger("t2serve.sapt")
MAX_INPUT_TOKENS = 48  # a generated request longer than this is cut


def trigger_ids(tokenizer, task_name: str) -> list[int]:
    """What the generator continues: a plain line naming the task (not a chat turn)."""
    return tokenizer.encode(f"A request for the task '{task_name}':\n", add_special_tokens=False)


def train_generator(base, data: TaskData, bundle_like: SAPTBundle, *, seed: int, task_index: int, steps: int,
                    lr: float, batch_size: int, micro_batch: int, on_step: Callable[[dict], None] | None = None
                    ) -> SAPTBundle:
    """A one-task bundle whose block writes ``data``'s requests (the user message) after the trigger."""
    tok = base.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, task_index, 7))
        gen = SAPTBundle(dict(zip(bundle_like.target_names, bundle_like.shapes)), bundle_like.d_model, num_tasks=1,
                         rank=bundle_like.rank, alpha=bundle_like.alpha, hidden=1)
    gen = gen.to(base.device)
    trigger = trigger_ids(tok, data.name)
    questions = [reply_ids(tok, q)[-MAX_INPUT_TOKENS:] for q in data.train_questions]
    block = list(gen.tasks[0].A) + list(gen.tasks[0].B)

    def next_batch(step: int):
        idx = data.batch(seed, task_index + 10_000, step, batch_size)  # an order of its own
        return [trigger] * len(idx), [questions[i] for i in idx]

    train_steps(base, gen, adam([(block, lr)]), steps, batch_size, micro_batch, next_batch, None, on_step=on_step)
    return gen.requires_grad_(False)


def sample_inputs(engine, base, data: TaskData, generator: SAPTBundle, n: int, seed: int) -> list[list[int]]:
    """``n`` sampled requests (temperature 1), as the task's chat prompts; empty ones are dropped."""
    tok = base.tokenizer
    trigger = trigger_ids(tok, data.name)
    params = [SamplingParams(max_tokens=MAX_INPUT_TOKENS, temperature=1.0, seed=seed * 65_536 + i) for i in range(n)]
    gens = generate(engine, [trigger] * n, row_adaptations(generator, None, n), params)
    prompts = []
    for g in gens:
        text = g.text.strip()
        if text:
            prompts.append(data.task.prompt_ids(tok, Example(id="pseudo", question=text, answer=None)))
    log.info("%s: %d pseudo-inputs, e.g. %r", data.name, len(prompts), gens[0].text.strip()[:80] if gens else "")
    return prompts
