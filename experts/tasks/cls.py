"""The classification task of Transformer²'s pass 1: which category (code, math, reasoning) a request
belongs to. The classifier expert is trained on it with the SVF recipe.

The prompt is exactly the one pass 1 asks at serving time (``experts.pass1.classify``: a system message with
one guideline per category, the request as the user turn, the reply opened with ``\\boxed{``), with the
categories the three training experts register, so the expert learns the decision it will be used
for. The reply is the label and a closing brace ("math}"); pass 1 reads the label's first-token
probability, generation here reads the written label.

Built from the three training tasks, with their own splits: the request is the user message each task
would send (GSM8K -> math, MBPP -> code, ARC-Easy -> reasoning). ``train`` and ``val`` are class-balanced
(a stable hash picks which records); ``test`` is the unseen tasks' test data (MATH-500 -> math,
HumanEval -> code, ARC-Challenge -> reasoning): routing measured where pass 1 is used.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from experts.pass1.classify import build_classifier_prompt
from experts.tasks.answers import boxed
from experts.tasks.arc import ARC
from experts.tasks.base import Example, Task
from experts.tasks.code import MBPP, HumanEval
from experts.tasks.gsm8k import GSM8K
from experts.tasks.math500 import MATH500

CATEGORIES = ("code", "math", "reasoning")  # what the trained experts register; pass 1 adds "other"
SOURCES = {  # split -> the tasks whose requests make up that split
    "train": ((GSM8K(), "train"), (MBPP(), "train"), (ARC("arc-easy", "Easy"), "train")),
    "val": ((GSM8K(), "val"), (MBPP(), "val"), (ARC("arc-easy", "Easy"), "val")),
    "test": ((MATH500(), "test"), (HumanEval(), "test"), (ARC("arc-challenge", "Challenge"), "test")),
}


def parse_category(completion: str, categories=CATEGORIES) -> str:
    """The label written after the prompt's ``\\boxed{`` ("math}" -> "math"); a repeated full
    ``\\boxed{math}`` is read too. Anything else is "other" (pass 1 then keeps the base weights)."""
    text = boxed(completion) if "\\boxed" in completion else completion.split("}")[0]
    m = re.match(r"\s*(?:\\text\{)?\s*([A-Za-z_-]+)", text or "")
    label = m.group(1).lower() if m else ""
    return label if label in categories else "other"


def _stable_order(ex: Example) -> bytes:
    return hashlib.sha256(ex.id.encode()).digest()


class Classification(Task):
    """The classification task over ``categories`` (sorted, as pass 1 lists them), its splits built from
    ``sources`` (split -> (task, split of that task) pairs), its prompt written with ``guidelines``."""

    category = "classifier"
    max_tokens = 8

    def __init__(self, name: str = "cls", categories=CATEGORIES, sources=None, guidelines: dict | None = None):
        self.name, self.categories = name, tuple(sorted(categories))
        self.sources, self.guidelines = sources or SOURCES, guidelines
        self._prompt = None  # (tokenizer, ClassifierPrompt) of the last tokenizer asked for

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        per_source = [(task, task.load(data_root, s)) for task, s in self.sources[split]]
        if split != "test":  # balance the classes so a constant answer scores one third
            n = min(len(exs) for _, exs in per_source)
            per_source = [(t, sorted(exs, key=_stable_order)[:n]) for t, exs in per_source]
        out = [Example(id=f"cls/{ex.id}", question=ex.question, answer=task.category,
                       reference=f"{task.category}}}", meta={"source": task.name})
               for task, exs in per_source for ex in exs]
        return sorted(out, key=_stable_order)  # interleave the classes

    def prompt_ids(self, tokenizer, ex: Example) -> list[int]:
        if self._prompt is None or self._prompt[0] is not tokenizer:
            self._prompt = (tokenizer, build_classifier_prompt(tokenizer, list(self.categories), self.guidelines))
        return self._prompt[1].ids_for(tokenizer, ex.question)

    def messages(self, ex: Example) -> list[dict[str, str]]:
        raise TypeError("the classification prompt ends inside the reply (\\boxed{); use prompt_ids")

    def parse(self, ex: Example, completion: str):
        return parse_category(completion, self.categories)

    def score(self, ex: Example, completion: str) -> bool:
        return parse_category(completion, self.categories) == ex.answer
