"""Benchmark tasks as plug-ins: a loader per split, the chat prompt, and a scorer of the reply.

``get_task(name)`` returns the task object; ``TASKS`` lists them. A new task subclasses
``base.Task`` and is added here. Scoring of generated code goes through ``sandbox.py`` (a separate,
limited process), never through ``exec`` in the caller. Nothing here loads a model or reads data at
import time; data paths are always arguments.
"""
from __future__ import annotations

from experts.tasks.arc import ARC, ARCText
from experts.tasks.base import Example, Task, render_prompt
from experts.tasks.cls import Classification
from experts.tasks.code import MBPP, HumanEval
from experts.tasks.gsm8k import GSM8K
from experts.tasks.math500 import MATH500
from experts.tasks.miniature import MINIATURE_TASKS
from experts.tasks.miniature import classification as miniature_classification
from experts.tasks.synthetic import SYNTHETIC_TASKS

TASKS: dict[str, Task] = {t.name: t for t in (
    GSM8K(), MBPP(), HumanEval(), ARC("arc-easy", "Easy"), ARC("arc-challenge", "Challenge"),
    ARCText("arc-easy-text", "Easy"), ARCText("arc-challenge-text", "Challenge"), MATH500(),
    Classification(), *SYNTHETIC_TASKS, *MINIATURE_TASKS, miniature_classification(),
)}
ALIASES = {"arc": "arc-easy", "classifier": "cls", "math": "math500"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


__all__ = ["ALIASES", "Example", "TASKS", "Task", "get_task", "render_prompt"]
