"""Scores a_{i,j}: greedy replies to each task's test prompts through the project's engine, every prompt
carrying the adaptation the server would give it (routed: the bundle's attention on that prompt; a
plain LoRA: its one block at weight 1), scored by the task's exact scorer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from adapters import SAPTBundle
from engine.contract import SamplingParams
from experts.sapt.blocks import row_adaptations
from experts.sapt.data import TaskData
from experts.sapt.routing import batched_attention, serving_copy
from experts.train.rollout import generate, make_engine

MAX_MODEL_LEN = 160  # prompts of the generated tasks are ~50 tokens, replies <= 24, generator inputs <= 48


@dataclass
class TaskScores:
    accuracy: dict[str, float]  # task name -> fraction correct
    attention: dict[str, list[float]] | None  # routed only: task name -> mean attention over the bundle's tasks
    seconds: float


class Evaluator:
    def __init__(self, base, max_num_seqs: int | None = None, max_model_len: int = MAX_MODEL_LEN):
        slots = max_num_seqs or (256 if base.device.type == "cuda" else 64)
        self.base = base
        self.engine = make_engine(base, slots, max_model_len)

    def score(self, bundle: SAPTBundle, routed: bool, tasks: Sequence[TaskData]) -> TaskScores:
        t0 = time.perf_counter()
        served = serving_copy(bundle, self.base.device)
        prompts, params, adaptations, spans = [], [], [], {}
        attention = {}
        for data in tasks:
            n = len(data.test_prompts)
            spans[data.name] = (len(prompts), len(prompts) + n)
            prompts += data.test_prompts
            params += [SamplingParams(max_tokens=data.task.max_tokens, temperature=0.0)] * n
            if routed:
                attn = batched_attention(self.base.model, served, data.test_prompts)  # (n, T)
                attention[data.name] = attn.mean(0).tolist()
                adaptations += row_adaptations(served, attn, n)
            else:
                adaptations += row_adaptations(served, None, n)
        gens = generate(self.engine, prompts, adaptations, params)
        accuracy = {}
        for data in tasks:
            a, b = spans[data.name]
            verdicts = data.task.score_many(data.test, [g.text for g in gens[a:b]])
            accuracy[data.name] = sum(verdicts) / len(verdicts)
        return TaskScores(accuracy, attention if routed else None, round(time.perf_counter() - t0, 3))

    def mean_attention(self, bundle: SAPTBundle, prompts: Sequence[list[int]]) -> torch.Tensor:
        """(T,) mean attention of the (served form of the) bundle on these prompts."""
        return batched_attention(self.base.model, serving_copy(bundle, self.base.device), prompts).mean(0)
