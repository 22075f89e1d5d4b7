"""The task sequence as token ids, tokenized once per run and shared by every method and seed.

Prompts are exactly what the server routes on: the task's chat prompt through the model's template
(``Task.prompt_ids``). Replies are the reference answer followed by EOS (next-token objective).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.tasks import Example, Task, get_task


@dataclass
class TaskData:
    task: Task
    train_prompts: list[list[int]]
    train_replies: list[list[int]]  # reference answer ids + EOS
    train_questions: list[str]  # the user messages (what ARM's generator learns to write)
    val_prompts: list[list[int]]  # ARM's mean attention vector is measured on these
    test: list[Example]
    test_prompts: list[list[int]]

    @property
    def name(self) -> str:
        return self.task.name

    def batch(self, seed: int, task_index: int, step: int, size: int) -> list[int]:
        """Indices of training examples for ``step``: a fresh permutation per epoch, seeded by the run's
        seed and the task's place in the sequence (so a method resumed or branched at a task boundary
        sees the same data order)."""
        n = len(self.train_prompts)
        per_epoch = max(n // size, 1)
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(derive_seed(seed, task_index, 1 + epoch))
        order = torch.randperm(n, generator=g)
        return order[pos * size:(pos + 1) * size].tolist()


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for one purpose of one run (block init, data order, sampling), stable across methods."""
    out = seed
    for p in parts:
        out = (out * 1_000_003 + p + 1) % (2**63 - 1)
    return out


def reply_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


class TaskPool:
    """Loads and tokenizes each named task once."""

    def __init__(self, tokenizer, data_root: str | None, train_limit: int | None, val_limit: int | None,
                 test_limit: int | None):
        self.tokenizer, self.data_root = tokenizer, data_root
        self.limits = (train_limit, val_limit, test_limit)
        self._tasks: dict[str, TaskData] = {}

    def get(self, name: str) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = self._load(get_task(name))
        return self._tasks[name]

    def _load(self, task: Task) -> TaskData:
        tok = self.tokenizer
        train_limit, val_limit, test_limit = self.limits
        train = task.load(self.data_root, "train")[:train_limit]
        val = task.load(self.data_root, "val")[:val_limit]
        test = task.load(self.data_root, "test")[:test_limit]
        if not train or not val or not test:
            raise ValueError(f"task {task.name!r} needs train, val and test examples")
        return TaskData(task, [task.prompt_ids(tok, e) for e in train], [reply_ids(tok, e.reference) for e in train],
                        [e.question for e in train], [task.prompt_ids(tok, e) for e in val], test,
                        [task.prompt_ids(tok, e) for e in test])
