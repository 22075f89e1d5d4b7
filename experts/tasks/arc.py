"""ARC (AI2 Reasoning Challenge, CC BY-SA 4.0), Easy and Challenge sets: reward = the choice letter
read from the reply equals the answer key.

Files ``arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl`` map to the train/val/test splits. A few
questions label their choices 1-4; they are shown (and scored) as A-D so every prompt looks alike.
"""
from __future__ import annotations

from pathlib import Path

from experts.tasks.answers import choice_letter
from experts.tasks.base import Example, Task, data_file, read_jsonl

FILES = {"train": "Train", "val": "Dev", "test": "Test"}
LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the letter of the correct choice."


def arc_example(r: dict) -> Example:
    choices = r["question"]["choices"]
    labels = [c["label"] for c in choices]
    shown = list(LETTERS[:len(choices)])
    key = shown[labels.index(r["answerKey"])]
    lines = [r["question"]["stem"], ""] + [f"{s}. {c['text']}" for s, c in zip(shown, choices)]
    question = "\n".join(lines) + f"\n\n{INSTRUCTION}"
    text = choices[labels.index(r["answerKey"])]["text"]
    return Example(id=f"arc/{r['id']}", question=question, answer=key, reference=f"The answer is {key}. {text}",
                   meta={"labels": shown, "choices": [c["text"] for c in choices]})


class ARC(Task):
    category = "reasoning"
    max_tokens = 64

    def __init__(self, name: str, subset: str):
        self.name, self.subset = name, subset  # subset: "Easy" | "Challenge"

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        path = data_file(data_root, "arc", f"ARC-{self.subset}-{FILES[split]}.jsonl")
        return [arc_example(r) for r in read_jsonl(path)]

    def parse(self, ex: Example, completion: str):
        return choice_letter(completion, list(ex.meta["labels"]), list(ex.meta["choices"]))

    def score(self, ex: Example, completion: str) -> bool:
        return self.parse(ex, completion) == ex.answer
