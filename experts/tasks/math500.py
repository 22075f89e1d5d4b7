"""MATH-500 (competition math, MIT; evaluation only): reward = the last \\boxed{} answer of the reply
equals the gold answer after normalisation (``answers.math_equal``)."""
from __future__ import annotations

from pathlib import Path

from experts.tasks.answers import boxed, math_equal
from experts.tasks.base import Example, Task, data_file, read_jsonl

INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."


class MATH500(Task):
    name = "math500"
    category = "math"
    max_tokens = 384
    splits = ("test",)

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        return [Example(id=r["unique_id"], question=f"{r['problem']}\n{INSTRUCTION}", answer=r["answer"],
                        reference=f"{r['solution']}")
                for r in read_jsonl(data_file(data_root, "math500", "test.jsonl"))]

    def parse(self, ex: Example, completion: str):
        return boxed(completion)

    def score(self, ex: Example, completion: str) -> bool:
        return math_equal(boxed(completion), ex.answer)
